"""A Flat gallery opened for reading is mapped in place (index/mapped.py) and answers exactly what the
copying store answers: same ids in the same order, the same vectors bit for bit, the same rankings and
scores, ties included, over a base and segments with tombstones and re-added ids."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from index import Gallery, IntegrityError, StoreError, VectorStore
from index.layout import BASE, ROWS, IndexDir
from index.mapped import MappedFlat
from index.mapped_ivf import LayeredIVF
from index.segments import load_live_store, write_segment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 16


def _unit(rng, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _live_set(path, seed: int, base: int = 40, segments: int = 4, dim: int = DIM, ties: bool = True,
              factory: str = "Flat") -> dict:
    """Write a base of `base` rows (none when 0) and `segments` segments, each removing some live ids
    (one of them re-added with a new vector in the same segment) and adding rows, some of them copies of
    earlier vectors (equal scores); returns the index metadata naming that live set."""
    rng = np.random.default_rng(seed)
    files, live, next_id = [], {}, 0
    if base:
        ids = np.arange(base, dtype=np.int64) * 7 + 3
        vecs = _unit(rng, base, dim)
        store = VectorStore.from_vectors(ids, vecs, factory, use_gpu=False)
        sha = store.write(path / "vectors.00000001.faiss")
        files.append({"name": "vectors.00000001.faiss", "kind": BASE, "sha256": sha, "rows": base})
        live = {int(i): v for i, v in zip(ids, store.reconstruct(ids))}
        next_id = int(ids.max()) + 1
    for s in range(segments):
        alive = sorted(live)
        removed = [int(i) for i in rng.choice(alive, min(len(alive), int(rng.integers(0, 6))), replace=False)] \
            if alive else []
        n_new = int(rng.integers(1, 12))
        ids = list(range(next_id, next_id + n_new))
        next_id += n_new
        if removed:
            ids.append(removed[0])  # removed, then re-added under the same id with a new vector
        vecs = _unit(rng, len(ids), dim)
        if ties and live:
            vecs[0] = live[sorted(live)[0]]  # an exact copy of a stored vector: equal scores for every query
        for i in removed:
            live.pop(i)
        live.update({int(i): v for i, v in zip(ids, vecs)})
        name = f"segment.{s + 2:08d}.rows"
        sha, _ = write_segment(path / name, dim, removed, ids, vecs)
        files.append({"name": name, "kind": ROWS, "sha256": sha, "rows": len(ids), "removed": len(removed)})
    return {"version": len(files), "dim": dim, "factory": factory, "rows": len(live), "segments": files}


def _both(path, meta):
    layout = IndexDir(path)
    copied = load_live_store(layout, meta, use_gpu=False)
    mapped = load_live_store(layout, meta, use_gpu=False, mapped=True)
    assert isinstance(copied, VectorStore) and isinstance(mapped, MappedFlat)
    return copied, mapped


@pytest.mark.parametrize("seed, base, segments", [(0, 40, 4), (1, 0, 5), (2, 25, 0), (3, 3, 6), (4, 60, 8)])
def test_the_mapped_store_answers_exactly_what_the_copying_store_answers(tmp_path, seed, base, segments):
    copied, mapped = _both(tmp_path, _live_set(tmp_path, seed, base, segments))
    assert len(mapped) == len(copied) > 0
    assert np.array_equal(mapped.ids(), copied.ids())  # storage order, not only the same set
    ids = copied.ids()
    assert np.array_equal(mapped.reconstruct(ids).view(np.uint32), copied.reconstruct(ids).view(np.uint32))
    assert np.array_equal(mapped.reconstruct(ids[::-1]), copied.reconstruct(ids[::-1]))
    assert mapped.max_norm() == copied.max_norm() == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(seed + 100)
    few = _unit(rng, 3)
    for k in (1, 5, len(ids), len(ids) + 4):  # the store's scan: same order, ties and padding included
        got, want = mapped.search(few, k), copied.search(few, k)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), k
    many = _unit(rng, 25)  # FAISS's blocked search per block, merged: same scores, same ids (no ties)
    for k in (1, 7, len(ids) + 2):
        got, want = mapped.search(many, k), copied.search(many, k)
        assert np.array_equal(got[0], want[0]), k
        for q, g, w, s in zip(many, got[1], want[1], want[0]):  # equal scores may come in another order
            above = s > s[-1]
            assert sorted(zip(s[above], g[above])) == sorted(zip(s[above], w[above]))
            real = g >= 0  # and whichever copy is returned at the cut, it has that score
            assert np.allclose(mapped.reconstruct(g[real]).astype(np.float64) @ q, s[real], atol=1e-6)


def test_equal_scores_come_in_storage_order_through_segments_and_tombstones(tmp_path):
    copied, mapped = _both(tmp_path, _live_set(tmp_path, 5, base=20, segments=6))
    q = copied.reconstruct(copied.ids()[:1])  # the vector copied into every segment: one score per copy
    scores, ids = mapped.search(q, len(mapped))
    assert np.array_equal(ids, copied.search(q, len(copied))[1])
    top = ids[0][scores[0] == scores[0][0]]
    assert len(top) >= 3
    order = {int(i): r for r, i in enumerate(copied.ids())}
    assert [order[int(i)] for i in top] == sorted(order[int(i)] for i in top)


def test_unknown_ids_additions_and_bad_queries_are_refused(tmp_path):
    copied, mapped = _both(tmp_path, _live_set(tmp_path, 6))
    gone = np.setdiff1d(np.arange(copied.ids().max() + 2), copied.ids())
    with pytest.raises(StoreError, match=f"id {gone[0]}"):
        mapped.reconstruct([copied.ids()[0], gone[0]])
    with pytest.raises(StoreError, match="read-only"):
        mapped.add([10 ** 6], _unit(np.random.default_rng(0), 1))
    for bad, k in ((np.full(DIM, np.nan, np.float32), 3), (_unit(np.random.default_rng(0), 1), 0)):
        with pytest.raises(ValueError):
            mapped.search(bad, k)


@pytest.mark.parametrize("victim", [0, -1])
def test_a_tampered_file_is_refused_before_it_is_mapped(tmp_path, victim):
    meta = _live_set(tmp_path, 7)
    path = tmp_path / meta["segments"][victim]["name"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # one bit of one vector
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="repair"):
        load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)


def test_tombstones_must_hit_stored_ids_and_row_counts_must_match(tmp_path):
    meta = _live_set(tmp_path, 8)
    meta["rows"] += 1
    with pytest.raises(StoreError, match="catalog recorded"):
        load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)
    meta = _live_set(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, 9)
    name = "segment.00000099.rows"
    sha, _ = write_segment(tmp_path / "b" / name, DIM, [10 ** 9], [], np.zeros((0, DIM), np.float32))
    meta["segments"].append({"name": name, "kind": ROWS, "sha256": sha, "rows": 0})
    with pytest.raises(StoreError, match="removes 1 ids of which only 0"):
        load_live_store(IndexDir(tmp_path / "b"), meta, use_gpu=False, mapped=True)


@pytest.mark.parametrize("seed, segments", [(0, 4), (1, 8), (2, 1)])
def test_an_ivf_base_with_segments_layered_on_it_answers_as_the_copying_store(tmp_path, seed, segments):
    # index/mapped_ivf.py: the base's lists stay mapped, the segments' rows and tombstones are layered on them.
    from encoder.certify import certify_topk_bruteforce, float32_dot_error
    from retrieval.ivf_search import certified_ivf_search
    meta = {**_live_set(tmp_path, seed, base=400, segments=segments, factory="IVF8,Flat"), "params": {"nprobe": 2}}
    copied = load_live_store(IndexDir(tmp_path), meta, use_gpu=False)
    layered = load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)
    assert isinstance(layered, LayeredIVF) and layered.read_only and not copied.read_only
    ids = copied.ids()
    assert layered.ntotal == copied.ntotal == len(ids) and sorted(layered.ids().tolist()) == sorted(ids.tolist())
    assert np.array_equal(layered.reconstruct(ids), copied.reconstruct(ids))  # bit for bit, live versions
    dead = np.setdiff1d(np.arange(400) * 7 + 3, ids)  # base ids a segment removed and did not add back
    if len(dead):
        with pytest.raises(StoreError, match="not stored"):
            layered.reconstruct(dead[:1])
    live = copied.reconstruct(ids).astype(np.float64)
    rows = set(layered.rows.ids().tolist())
    gamma = float32_dot_error(DIM, 1 + 1e-6, 1.0)
    queries = _unit(np.random.default_rng(seed + 100), 6)
    for exact in (True, False):
        scores, got = layered.search(queries, 12, exact=exact)
        for x, s, g in zip(queries, scores, got):
            truth = live @ x.astype(np.float64)
            assert len(set(g.tolist())) == 12 and np.isin(g, ids).all() and np.all(np.diff(s) <= 0)
            at = {int(i): n for n, i in enumerate(ids)}
            mine = truth[[at[int(i)] for i in g]]
            assert np.all(np.abs(s - mine) <= gamma)
            if exact:  # the true top-12 scores
                np.testing.assert_allclose(np.sort(mine)[::-1], np.sort(truth)[::-1][:12], atol=2 * gamma)
            else:  # the segments' rows are searched exhaustively: none better than the 12th is missing
                better = [int(i) for i, t in zip(ids, truth) if int(i) in rows and t > mine.min() + 2 * gamma]
                assert set(better) <= set(g.tolist())
    lists = layered.certified_lists()
    for x in queries:
        found = certified_ivf_search(lists, x, 5, 1.0, slack=1e-6, exclude=[int(ids[0])])
        keep = np.arange(len(ids)) != 0
        top, radius, _ = certify_topk_bruteforce(x, live[keep], 5, 1.0, slack=1e-6)
        assert found.exhaustive and found.ids.tolist() == ids[keep][top].tolist()
        np.testing.assert_allclose(found.cert.radius, radius, rtol=1e-9, atol=1e-12)
    with pytest.raises(StoreError, match="read-only"):
        layered.add([10 ** 7], queries[:1])


def test_tombstones_on_a_layered_ivf_base_must_hit_stored_ids(tmp_path):
    meta = _live_set(tmp_path, 5, base=400, segments=2, factory="IVF8,Flat")
    name = "segment.00000099.rows"
    sha, _ = write_segment(tmp_path / name, DIM, [10 ** 9, 3], [], np.zeros((0, DIM), np.float32))
    meta["segments"].append({"name": name, "kind": ROWS, "sha256": sha, "rows": 0})
    meta["rows"] -= 1
    with pytest.raises(StoreError, match="removes 2 ids of which only 1"):
        load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)


_RSS = """
import json, sys
import numpy as np
from index.layout import IndexDir
from index.segments import load_live_store
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
meta = json.loads(sys.argv[2])
before = anon()
store = load_live_store(IndexDir(sys.argv[1]), meta, use_gpu=False, mapped=sys.argv[3] == "mapped")
q = store.reconstruct(store.ids()[:1])
store.search(q, 10)
print(anon() - before)
"""


def test_a_mapped_gallery_holds_its_vectors_in_the_file_pages_not_in_the_process(tmp_path):
    """Anonymous memory a fresh process gains by opening (and searching) ~51 MB of vectors: the copying
    store holds them all, the mapped store only ids, flags and one score per row (~21 bytes a row)."""
    n, dim = 100_000, 128
    rng = np.random.default_rng(0)
    base = VectorStore.from_vectors(np.arange(n // 2), _unit(rng, n // 2, dim), "Flat", use_gpu=False)
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "sha256": base.write(tmp_path / "vectors.00000001.faiss"),
              "rows": n // 2}]
    sha, _ = write_segment(tmp_path / "segment.00000002.rows", dim, [0, 1], np.arange(n // 2, n), _unit(rng, n // 2, dim))
    files.append({"name": "segment.00000002.rows", "kind": ROWS, "sha256": sha, "rows": n // 2})
    meta = json.dumps({"version": 2, "dim": dim, "factory": "Flat", "rows": n - 2, "segments": files})
    gained = {}
    for how in ("copied", "mapped"):
        out = subprocess.run([sys.executable, "-c", _RSS, str(tmp_path), meta, how], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        gained[how] = int(out.stdout.split()[-1])
    vectors = n * dim * 4
    assert gained["copied"] > 0.9 * vectors, gained
    assert gained["mapped"] < 0.3 * vectors, gained


def test_every_live_file_is_mapped_readable_after_deletion_and_unmapped_when_dropped(tmp_path):
    meta = _live_set(tmp_path, 10, ties=False)
    copied = load_live_store(IndexDir(tmp_path), meta, use_gpu=False)
    mapped = load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)
    maps = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert len(maps) >= len(meta["segments"])  # every live file is mapped, none copied in
    for path in {line.split()[-1] for line in maps}:
        os.unlink(path)  # a writer's compaction deletes old files: the mapping keeps them readable
    q = _unit(np.random.default_rng(1), 2)
    assert np.array_equal(mapped.search(q, 5)[1], copied.search(q, 5)[1])
    del mapped
    import gc
    gc.collect()
    assert not [line for line in open("/proc/self/maps") if str(tmp_path) in line]


def test_gallery_open_maps_a_flat_gallery(tmp_path, sample_folder, tiny_lipsim):
    from index import IngestOptions, build_index
    index_dir = tmp_path / "index"
    build_index(sample_folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=1, batch_size=4, merge_tiers=False))
    with Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=False) as g:
        assert isinstance(g.store, MappedFlat) and len(g) > 0
        ids, vecs = g.all_vectors()
        scores, found = g.search(vecs[:2], 3)
        assert list(found[:, 0]) == list(ids[:2])
        largest = float(np.linalg.norm(vecs.astype(np.float64), axis=1).max())
        assert largest <= g.max_norm <= largest * (1 + 1e-5)
    with pytest.raises(StoreError, match="closed"):
        g.search(vecs[:1], 1)


def test_an_ivf_gallery_of_one_base_is_mapped_read_only_and_answers_as_loaded(tmp_path):
    from index.ivf import CertifiedIVF
    from retrieval.ivf_search import certified_ivf_search
    rng = np.random.default_rng(11)
    n, dim = 2000, 32
    ids = np.arange(n, dtype=np.int64) * 5 + 1
    store = VectorStore.from_vectors(ids, _unit(rng, n, dim), "IVF16,Flat", use_gpu=False)
    sha = store.write(tmp_path / "vectors.00000001.faiss")
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "sha256": sha, "rows": n}]
    meta = {"version": 1, "dim": dim, "factory": "IVF16,Flat", "rows": n, "segments": files, "params": {"nprobe": 4}}
    copied = load_live_store(IndexDir(tmp_path), meta, use_gpu=False)
    mapped = load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)
    assert mapped.read_only and not copied.read_only and mapped.factory == copied.factory == "IVF16,Flat"
    assert np.array_equal(mapped.ids(), copied.ids())
    assert np.array_equal(mapped.reconstruct(ids[::7]), copied.reconstruct(ids[::7]))
    q = _unit(rng, 5, dim)
    for exact in (False, True):
        got, want = mapped.search(q, 10, exact=exact), copied.search(q, 10, exact=exact)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    a, b = CertifiedIVF.from_faiss(mapped.index), CertifiedIVF.from_faiss(copied.index)
    assert np.array_equal(a.rho, b.rho) and a.max_norm == b.max_norm
    for x in q:
        fa, fb = certified_ivf_search(a, x, 5, 1.0, slack=1e-6), certified_ivf_search(b, x, 5, 1.0, slack=1e-6)
        assert np.array_equal(fa.ids, fb.ids) and np.array_equal(fa.cert.radius, fb.cert.radius)
    for change in (lambda: mapped.add([7], _unit(rng, 1, dim)), lambda: mapped.remove(ids[:2]),
                   lambda: mapped.write(tmp_path / "copy.faiss")):
        with pytest.raises(StoreError, match="read-only"):
            change()
    assert len(mapped) == n and not (tmp_path / "copy.faiss").exists()
    # with a segment after the base the base stays mapped and the segment is layered on it (index/mapped_ivf.py)
    sha, _ = write_segment(tmp_path / "segment.00000002.rows", dim, [ids[0]], [10 ** 6], _unit(rng, 1, dim))
    files.append({"name": "segment.00000002.rows", "kind": ROWS, "sha256": sha, "rows": 1})
    grown = load_live_store(IndexDir(tmp_path), {**meta, "version": 2, "segments": files}, use_gpu=False, mapped=True)
    assert isinstance(grown, LayeredIVF) and grown.read_only and len(grown) == n
    assert 10 ** 6 in set(grown.ids().tolist()) and ids[0] not in set(grown.ids().tolist())


def test_certifying_a_search_reconstructs_its_answer_without_sorting_every_id(tmp_path):
    copied, mapped = _both(tmp_path, _live_set(tmp_path, 12, base=50, segments=5))
    _, ids = mapped.search(_unit(np.random.default_rng(2), 2), 9)
    wanted = ids.ravel()[::-1]
    assert np.array_equal(mapped.reconstruct(wanted), copied.reconstruct(wanted))
    assert mapped._lookup is None  # answered from the rows the search remembered
    with pytest.raises(StoreError, match="10000000"):
        mapped.reconstruct([int(ids[0, 0]), 10 ** 7])  # an id no search returned: the sorted lookup refuses it
    assert mapped._lookup is not None
    assert np.array_equal(mapped.reconstruct(copied.ids()), copied.reconstruct(copied.ids()))


@pytest.mark.parametrize("dim", [4, 8])
def test_small_dimensions_give_scores_within_the_float32_bound_of_the_copying_store(tmp_path, dim):
    """FAISS's kernel batches rows for D = 2, 4, 8, so a mapped block's row may be summed in another
    order than in the copying store's single array: equal ids, scores within float32_dot_error."""
    from encoder.certify import float32_dot_error
    copied, mapped = _both(tmp_path, _live_set(tmp_path, 13, base=5, segments=3, dim=dim, ties=False))
    q = _unit(np.random.default_rng(3), 2, dim)
    got, want = mapped.search(q, len(copied)), copied.search(q, len(copied))
    assert np.allclose(got[0], want[0], rtol=0, atol=2 * float32_dot_error(dim))
    assert np.array_equal(np.sort(got[1]), np.sort(want[1]))  # the same items; order may swap only within the bound


def test_closing_twice_and_a_search_holding_mapped_ivf_lists_are_safe(tmp_path):
    from index.ivf import CertifiedIVF
    from retrieval.ivf_search import certified_ivf_search
    rng = np.random.default_rng(14)
    ids = np.arange(800, dtype=np.int64)
    store = VectorStore.from_vectors(ids, _unit(rng, 800, 24), "IVF8,Flat", use_gpu=False)
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "rows": 800,
              "sha256": store.write(tmp_path / "vectors.00000001.faiss")}]
    meta = {"version": 1, "dim": 24, "factory": "IVF8,Flat", "rows": 800, "segments": files}
    mapped = load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)

    class Catalog:
        def close(self):
            pass

    g = Gallery(IndexDir(tmp_path), Catalog(), mapped, {"index": meta, "root": str(tmp_path)})
    del mapped
    ivf = g.certified_ivf  # as a request holds it while the gallery is closed under it
    assert isinstance(ivf, CertifiedIVF) and not ivf.lists[0].vectors.flags.writeable
    g.close()
    g.close()  # a second close does nothing
    assert "closed" in repr(g)
    with pytest.raises(StoreError, match="closed"):
        len(g)
    import gc
    gc.collect()
    q = _unit(rng, 1, 24)[0]
    found = certified_ivf_search(ivf, q, 3, 1.0, slack=1e-6)  # the lists are still mapped: no crash
    want = store.search(q[None], 3, exact=True)[1][0]
    assert list(found.ids) == list(want)


@pytest.mark.parametrize("n, dim", [(0, 3), (1, 1), (7, 5), (300, 129)])
def test_the_base_file_parsed_in_place_is_what_faiss_reads(tmp_path, n, dim):
    import faiss

    from index.mapped import flat_base_views
    rng = np.random.default_rng(n)
    ids = rng.permutation(10 * n + 1)[:n].astype(np.int64) - 5 * n  # any order, negative ids too
    store = VectorStore.from_vectors(ids, _unit(rng, n, dim) if n else np.zeros((0, dim), np.float32), "Flat",
                                     use_gpu=False)
    path = tmp_path / "base.faiss"
    store.write(path)
    got_ids, rows = flat_base_views(path, path.read_bytes())
    theirs = faiss.read_index(str(path))
    assert np.array_equal(got_ids, faiss.vector_to_array(theirs.id_map))
    flat = faiss.downcast_index(theirs.index)
    assert rows.shape == (n, dim) and np.array_equal(rows, flat.reconstruct_n(0, n) if n else rows)
    assert not rows.flags.writeable and not got_ids.flags.writeable


def test_a_base_file_of_another_kind_or_size_is_refused_by_name(tmp_path):
    import faiss

    from index.mapped import flat_base_views
    x = _unit(np.random.default_rng(0), 50)
    good = tmp_path / "good.faiss"
    VectorStore.from_vectors(np.arange(50), x, "Flat", use_gpu=False).write(good)
    data = good.read_bytes()
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(DIM))
    l2.add_with_ids(x, np.arange(50))
    others = {"truncated": data[:-1], "longer": data + b"\0", "empty": b"", "header only": data[:40],
              "L2": faiss.serialize_index(l2).tobytes(),
              "IVF": faiss.serialize_index(VectorStore.from_vectors(np.arange(50), x, "IVF1,Flat", use_gpu=False)
                                           .index).tobytes(),
              "row count": data[:74] + (1).to_bytes(8, "little") + data[82:],
              "dimension": data[:4] + (DIM + 1).to_bytes(4, "little") + data[8:],
              "is_trained 2": data[:32] + b"\x02" + data[33:],  # FAISS itself refuses a bool that is not 0 or 1
              "inner is_trained 0": data[:69] + b"\x00" + data[70:]}
    for name, blob in others.items():
        with pytest.raises(StoreError, match="not a flat inner-product index as robret writes it.*repair"):
            flat_base_views(good, blob)
        (tmp_path / "bad.faiss").write_bytes(blob)
        with pytest.raises(StoreError, match="repair"):
            MappedFlat.read(tmp_path / "bad.faiss", "Flat")
    assert len(flat_base_views(good, data)[0]) == 50


def test_a_mapped_base_holds_no_copy_of_its_ids(tmp_path):
    """A base-only gallery of 400,000 rows: opening and searching it mapped costs the process a few bytes a
    row (alive flags, one float32 score a row while scanning), not FAISS's ids and their hash table (~50)."""
    n, dim = 400_000, 16
    x = _unit(np.random.default_rng(2), n, dim)
    base = VectorStore.from_vectors(np.arange(n), x, "Flat", use_gpu=False)
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "sha256": base.write(tmp_path / "vectors.00000001.faiss"),
              "rows": n}]
    del base
    meta = json.dumps({"version": 1, "dim": dim, "factory": "Flat", "rows": n, "segments": files})
    out = subprocess.run([sys.executable, "-c", _RSS_CERTIFY, str(tmp_path), meta], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert int(out.stdout.split()[-1]) < 16 * n, out.stdout  # measured: ~5 bytes a row (before: ~70)


_RSS_CERTIFY = """
import json, sys
import numpy as np
from index.layout import IndexDir
from index.segments import load_live_store
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
meta = json.loads(sys.argv[2])
before = anon()
store = load_live_store(IndexDir(sys.argv[1]), meta, use_gpu=False, mapped=True)
q = np.ones((1, meta["dim"]), np.float32) / np.sqrt(meta["dim"])
store.reconstruct(store.search(q, 10)[1][0])  # what a certified query does
print(anon() - before)
"""


@pytest.mark.parametrize("d", [4, 9])
@pytest.mark.parametrize("cuts", [(0, 20_000), (0, 1, 5_000, 5_001, 20_000), (0, 6_400, 12_801, 20_000)])
def test_a_scan_split_over_threads_scores_and_selects_as_one_pass(monkeypatch, cuts, d):
    # scan_top cuts the rows into one stretch per thread above 2·SPLIT_MIN rows (here lowered, with 4 threads
    # on any machine); each score must be bit for bit what one kernel call per block gives (D = 4: FAISS scores
    # rows in groups, so a cut at the wrong offset inside a block changed some scores), and the answer the exact
    # selection's, ties and dead rows included.
    import faiss

    import index.ivf as ivf
    from index.store import SCAN_BLOCK, _scan_pieces, _scan_scores, _select, scan_top

    monkeypatch.setattr(ivf, "SPLIT_MIN", 1_000)
    monkeypatch.setattr(ivf, "_threads", lambda: 4)
    rng = np.random.default_rng(len(cuts))
    n = cuts[-1]
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[6_390:6_420] = x[6_389]  # ties across a stretch boundary
    q = rng.standard_normal((3, d)).astype(np.float32)
    q[2] = x[6_389]
    blocks = [(faiss.swig_ptr(x[a:b]), b - a) for a, b in zip(cuts[:-1], cuts[1:])]
    ids = np.arange(n, dtype=np.int64) * 5 + 1
    dead = np.unique(np.concatenate([rng.integers(0, n, 40), [6_389, 6_400, n - 1]]))
    scores, found, rows = scan_top(q, 90, d, blocks, ids, dead)
    for j in range(3):
        one = np.empty(n, np.float32)
        for a, b in zip(cuts[:-1], cuts[1:]):
            faiss.fvec_inner_products_ny(faiss.swig_ptr(one[a:]), faiss.swig_ptr(q[j]), faiss.swig_ptr(x[a:b]), d, b - a)
        one[dead] = -np.inf
        every, stretches = np.empty(n, np.float32), _scan_pieces(blocks, d, n, dead)
        maxima = _scan_scores(stretches, q[j], d, every)
        assert len(stretches) > 1 and np.array_equal(every, one)  # every score, not only the answer's
        assert np.array_equal(maxima, [one[b:b + SCAN_BLOCK].max() for b in range(0, n, SCAN_BLOCK)])
        top = _select(one, 90)
        assert np.array_equal(rows[j], top) and np.array_equal(found[j], ids[top])
        assert np.array_equal(scores[j], one[top])


def test_a_split_scan_started_on_a_pool_thread_runs_there_instead_of_waiting_on_the_pool(monkeypatch):
    # A task of index.ivf's pool that scans (nested use) must not queue stretches behind itself: with one worker
    # it would wait forever.
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    import index.ivf as ivf
    from index.store import scan_top

    monkeypatch.setattr(ivf, "SPLIT_MIN", 1_000)
    monkeypatch.setattr(ivf, "_threads", lambda: 4)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robret-ivf")
    monkeypatch.setattr(ivf, "_EXECUTOR", pool)
    x = np.random.default_rng(0).standard_normal((9_000, 5)).astype(np.float32)
    ids = np.arange(9_000, dtype=np.int64)
    direct = scan_top(x[:2], 30, 5, [(faiss.swig_ptr(x), 9_000)], ids)
    nested = pool.submit(scan_top, x[:2], 30, 5, [(faiss.swig_ptr(x), 9_000)], ids).result(timeout=30)
    pool.shutdown()
    assert all(np.array_equal(a, b) for a, b in zip(direct, nested))


@pytest.mark.parametrize("kind", ["mapped", "flat", "ivf", "layered"])
def test_every_store_pads_past_its_last_hit_with_minus_flt_max_and_id_minus_one(kind):
    # (an empty gallery answered −∞ where every other pad is FAISS's −FLT_MAX)
    x = np.eye(4, dtype=np.float32)
    stores = {"mapped": lambda: MappedFlat(4), "flat": lambda: VectorStore.create(4, "Flat", use_gpu=False),
              "ivf": lambda: VectorStore.from_vectors(np.arange(4), x, "IVF1,Flat", use_gpu=False),
              "layered": lambda: LayeredIVF(VectorStore.from_vectors(np.arange(4), x, "IVF1,Flat", use_gpu=False))}
    store = stores[kind]()
    if kind in ("ivf", "layered"):
        store.remove(np.arange(4) if kind == "ivf" else [0, 1, 2])
    for q in (x[:1], x):
        scores, ids = store.search(q, 3, exact=True)
        live = store.ntotal
        assert (ids[:, live:] == -1).all() and (scores[:, live:] == -np.finfo(np.float32).max).all(), kind
        assert (ids[:, :live] >= 0).all()
