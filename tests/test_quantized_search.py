"""Int8 codes with a proved score bound (index/codes.py) and the certified search over them
(retrieval/quantized_search.py), against exact arithmetic and the brute-force certificate.

The bound is checked against float64 scores on adversarial rows (spikes, zeros, tiny and huge norms) and the
residual against exact rational arithmetic; certificates against `encoder.certify.certify_topk_bruteforce`
over the whole gallery, and attacked by PGD on the whole gallery's exact ranking.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _pgd import attack_certified_sets
from benchmarks.certified_search import clustered_unit_vectors
from encoder.certify import certify_topk_bruteforce, slack_for
from index.codes import QuantizedCodes, quantize
from retrieval.quantized_search import certified_quantized_search

TOL = 1e-9


def _rows(n, dim, seed, kind):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    if kind == "unit":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    elif kind == "spiky":  # one coordinate dominates: the scale is set by it, the rest rounds coarsely
        x[:, 0] = 50 * np.sign(x[:, 0])
    elif kind == "scales":  # norms from 1e-30 to 1e3, and zero rows
        x *= 10.0 ** rng.uniform(-30, 3, (n, 1))
        x[::7] = 0
    elif kind == "constant":  # LipSim's e = [x, 1]/‖[x, 1]‖: a large last coordinate
        x[:, -1] = 4
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.integers(1, 300), n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["unit", "spiky", "scales", "constant"]), qscale=st.sampled_from([1.0, 1e-3, 7.0]))
def test_every_score_is_at_most_its_upper_bound_plus_the_stated_error_and_not_far_below(dim, n, seed, kind, qscale):
    x = _rows(n, dim, seed, kind)
    codes = QuantizedCodes.from_vectors(np.arange(n), x)
    assert codes.max_norm >= np.linalg.norm(x.astype(np.float64), axis=1).max()
    rng = np.random.default_rng(seed + 1)
    for q in (rng.standard_normal(dim), x[rng.integers(n)].astype(np.float64) + 1e-3 * rng.standard_normal(dim)):
        q = (q / max(np.linalg.norm(q), 1e-30) * qscale).astype(np.float32)
        upper = codes.scan(q)[0].astype(np.float64)
        assert len(upper) % 64 == 0 and np.isneginf(upper[n:]).all()  # (padding rows: never listed)
        upper = upper[:n]
        err = codes.error(q)
        s = x.astype(np.float64) @ q.astype(np.float64)
        assert np.all(s <= upper + err), (s - upper - err).max()
        # and ū is ⟨q, ê⟩ + ν·δ, so it exceeds s by at most 2·ν·δ (+ float error): not a vacuous bound
        nu = np.linalg.norm(q.astype(np.float64)) * (1 + 1e-9)
        assert np.all(upper - s <= 2 * nu * codes.live()[3].astype(np.float64) + 2 * err + 1e-30)


def test_flushed_subnormals_stay_inside_the_error_term():
    # (review) With FTZ/DAZ on, a partial sum that cancels to a subnormal is flushed to 0, and the scale a = 2⁵⁶
    # multiplies that error: the underflow term must scale with a_max. Before: s = 8.5e-22 > ū + E = 8.6e-26.
    a = 2.0 ** 56
    x = np.array([[127 * a, a, -a]], np.float32)
    q = np.array([0.0, 2.0 ** -125, 2.0 ** -126 + 2.0 ** -149], np.float32)
    codes = QuantizedCodes.from_vectors([0], x)
    torch.set_flush_denormal(True)
    try:
        upper = float(codes.scan(q)[0][0])
        s = float(x.astype(np.float64)[0] @ q.astype(np.float64))
        assert s <= upper + codes.error(q)
    finally:
        torch.set_flush_denormal(False)


def test_a_query_that_would_overflow_float32_is_refused_and_searched_exactly(small_gallery, tiny_lipsim):
    # (review) Scores of −2e39 overflow float32: every ū was −inf, the partial list was taken for the whole
    # gallery and a wrong top-1 came out flagged exhaustive with radius 4.6e18.
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (200, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = (-1e18 * x).astype(np.float32)
    x[-1] *= np.float32(0.5)
    q = np.full(4, 1e21, np.float32)
    codes = QuantizedCodes.from_vectors(np.arange(200), x)
    assert not codes.covers(q) and codes.covers(q / np.float32(1e21))
    with pytest.raises(ValueError, match="range"):
        certified_quantized_search(codes, lambda i: x[i], q, 1, 1.0, slack=1e-5, max_norm=codes.max_norm)
    from index import Gallery
    from retrieval.search import search_embedding

    with Gallery.open(small_gallery, encoder=tiny_lipsim) as g:
        g.prepare_search()
        ids, vecs = g.all_vectors()
        assert search_embedding(g, vecs[3], k=2).method == "quantized"
        far = search_embedding(g, vecs[3] * np.float32(1e37), k=2)  # the exact scan answers it
        assert far.method == "exhaustive" and far.hits[0].id == int(ids[3])


def test_an_id_stored_twice_and_excluded_returns_no_answer_without_hanging():
    # (review) the early check counted rows, not ids: the loop never ended
    x = np.eye(2, dtype=np.float32)
    codes = QuantizedCodes.from_vectors([5, 5], x)
    assert certified_quantized_search(codes, lambda i: x[:len(i)], x[0], 1, 1.0, slack=1e-5, max_norm=1.0,
                                      exclude=[5]) is None


def test_residual_bounds_are_at_least_the_exact_rational_residuals():
    x = np.concatenate([_rows(20, 129, 1, "unit"), _rows(20, 17, 2, "scales")[:, :1].repeat(129, 1),
                        _rows(20, 129, 3, "spiky"), _rows(20, 129, 4, "constant")])
    codes, scale, resid = quantize(x)
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
    for row, w, a, d in zip(x, codes, scale, resid):
        exact = sum((Fraction(float(e)) - Fraction(float(a)) * int(c)) ** 2 for e, c in zip(row, w))
        assert Fraction(float(d)) ** 2 >= exact
        assert float(d) <= float(np.sqrt(float(exact))) * (1 + 1e-6) + 1e-45  # and tight


@pytest.mark.parametrize("n, split_min", [(5000, 100), (64 * 70, 100), (1, 100), (30, 10), (130, 10)])
def test_threads_split_the_scan_without_changing_a_bit_and_block_maxima_are_exact(monkeypatch, n, split_min):
    import index.ivf
    from index.store import _select, top_rows

    x = _rows(n, 33, 0, "unit")
    codes = QuantizedCodes.from_vectors(np.arange(n), x)
    q = x[min(17, n - 1)]
    whole, maxima = codes.scan(q)
    blocks = [whole[at:at + 64].max() for at in range(0, len(whole), 64)]
    assert np.array_equal(maxima, np.asarray(blocks, np.float32))
    monkeypatch.setattr(index.ivf, "SPLIT_MIN", split_min)  # (30 rows, 10: more threads than 64-row blocks)
    monkeypatch.setattr(index.ivf, "_threads", lambda: 3)
    split, split_maxima = codes.scan(q)
    assert np.array_equal(split, whole) and np.array_equal(split_maxima, maxima)
    for take in {1, min(n, 74), n}:
        assert np.array_equal(top_rows(whole, take, maxima=maxima), _select(whole, take))


@pytest.mark.parametrize("sizes", [(5000, 130, 1), (1, 64, 70), (64, 64)])
def test_a_scan_over_several_files_is_the_scan_of_their_rows_in_order(monkeypatch, sizes):
    import index.ivf
    from index.store import _select, top_rows

    x = _rows(sum(sizes), 33, 1, "unit")
    files = np.split(np.arange(len(x)), np.cumsum(sizes)[:-1])
    dead = [int(f[len(f) // 2]) for f in files]
    codes = QuantizedCodes.from_store(_mapped(x, files, dead=dead), chunk=50)
    assert [len(p.codes) for p in codes.parts] == [-(-n // 64) * 64 for n in sizes]
    q = x[3]
    whole, maxima = codes.scan(q)
    alone = np.concatenate([QuantizedCodes.from_vectors(f, x[f]).scan(q)[0] for f in files])  # (file by file)
    alone[np.isin(np.concatenate([np.pad(f, (0, -len(f) % 64), constant_values=-1) for f in files]), dead)] = -np.inf
    assert np.array_equal(whole, alone)
    assert np.array_equal(maxima, np.asarray([whole[at:at + 64].max() for at in range(0, len(whole), 64)]))
    monkeypatch.setattr(index.ivf, "SPLIT_MIN", 100)
    monkeypatch.setattr(index.ivf, "_threads", lambda: 3)
    split, split_maxima = codes.scan(q)
    assert np.array_equal(split, whole) and np.array_equal(split_maxima, maxima)
    live = len(x) - len(dead)
    for take in {1, min(live, 74), live}:
        rows = top_rows(whole, take, maxima=maxima)
        assert np.array_equal(rows, _select(whole, take)) and (codes.ids[rows] >= 0).all()


gallery_params = st.fixed_dictionaries({
    "n": st.integers(2, 400), "dim": st.integers(3, 40), "clusters": st.integers(1, 12),
    "k": st.integers(1, 8), "seed": st.integers(0, 2**16), "float_error": st.sampled_from([0.0, 1e-7, 1e-5]),
    "first": st.sampled_from([None, 0, 3]), "cap": st.sampled_from([None, 1, 12]), "drop": st.integers(0, 4),
    "files": st.integers(0, 3), "decoys": st.integers(0, 9),
})


def _coded(x, p, queries):
    """Codes of x (ids 0..n−1): as one part (files = 0), or from a mapped store of that many files whose first also
    holds `decoys` removed rows (other ids) that are the queries themselves: dead rows that would top every list."""
    from index.mapped import MappedFlat

    if not p["files"]:
        return QuantizedCodes.from_vectors(np.arange(len(x)), x)
    decoys = queries[np.arange(p["decoys"]) % len(queries)]
    y = np.concatenate([decoys, x])
    ids = np.concatenate([len(x) + np.arange(p["decoys"]), np.arange(len(x))])
    store = MappedFlat(x.shape[1])
    for rows in np.array_split(np.arange(len(y)), p["files"]):
        store.add(ids[rows], y[rows], stored=True)
    if p["decoys"]:
        store.remove(len(x) + np.arange(p["decoys"]))
    codes = QuantizedCodes.from_store(store)
    assert len(codes) == len(x) and sorted(codes.ids[codes.live_rows()].tolist()) == list(range(len(x)))
    return codes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=gallery_params)
def test_certificate_equals_the_exhaustive_one_and_is_never_larger_when_capped(p):
    x = clustered_unit_vectors(p["n"], p["dim"], p["clusters"], seed=p["seed"])
    queries = clustered_unit_vectors(4, p["dim"], p["clusters"], p["seed"], 9)
    queries = np.concatenate([queries, x[:2]])  # gallery items as queries: the tail bound matters most
    codes = _coded(x, p, queries)
    slack = slack_for(p["float_error"], codes.max_norm)
    for q in queries:
        drop = np.argsort(-(x.astype(np.float64) @ q.astype(np.float64)))[:p["drop"]]
        keep = np.setdiff1d(np.arange(p["n"]), drop)
        if len(keep) == 0:
            assert certified_quantized_search(codes, lambda i: x[i], q, 1, 1.0, slack=slack, max_norm=codes.max_norm,
                                              exclude=drop) is None
            continue
        k = min(p["k"], len(keep))
        pos, radius, set_radius = certify_topk_bruteforce(q, x[keep], k, 1.0, slack=slack)
        got = certified_quantized_search(codes, lambda i: x[i], q, k, 1.0, slack=slack, max_norm=codes.max_norm,
                                         exclude=drop, first=p["first"], cap_max=p["cap"])
        assert not set(got.ids.tolist()) & set(drop.tolist())
        assert got.cert.set_radius <= set_radius + TOL
        assert np.all(got.cert.radius <= radius + TOL)
        if got.exact_topk or got.cert.set_radius > 0:
            assert set(got.ids.tolist()) == set(keep[pos].tolist())
        if p["cap"] is None:
            assert got.exhaustive and not got.capped
        if got.exhaustive:
            assert got.ids.tolist() == keep[pos].tolist()
            np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)
        else:
            assert got.capped


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(20, 300), dim=st.integers(3, 24), clusters=st.integers(1, 8), seed=st.integers(0, 2**16),
       k=st.integers(1, 5), cap=st.sampled_from([None, 1, 6]))
def test_pgd_never_changes_the_topk_inside_the_quantized_certificate(n, dim, clusters, seed, k, cap):
    # The attacked "encoder" is e(x) = 2x − 1 on [0,1]^D (2-Lipschitz) whose clean input maps to the query; PGD
    # sees only the whole gallery's exact ranking. Capped certificates rest on the codes' bound B.
    x = clustered_unit_vectors(n, dim, clusters, seed=seed)
    queries = np.concatenate([clustered_unit_vectors(4, dim, clusters, seed, 9), x[:2]])
    codes = QuantizedCodes.from_vectors(np.arange(n), x)
    found = [(q, certified_quantized_search(codes, lambda i: x[i], q, k, 2.0, slack=slack_for(1e-7, codes.max_norm),
                                            max_norm=codes.max_norm, first=0, cap_max=cap)) for q in queries]
    best = attack_certified_sets(x, found)
    assert torch.all(best < 0), best


def _stores(x, tmp_path):
    """The same live gallery (ids 0..n−1 → x) in every store a reader may hold: a FAISS flat and IVF index, a
    mapped flat base with a segment whose tombstones remove ids stored with other vectors, and the layered IVF."""
    from index.mapped import MappedFlat
    from index.mapped_ivf import LayeredIVF
    from index.store import VectorStore

    n = len(x)
    moved = np.arange(0, n, 5)
    old = x.copy()
    old[moved] = np.roll(x, 1, axis=0)[moved]
    flat = VectorStore.from_vectors(np.arange(n), old, "Flat", use_gpu=False)
    flat.write(tmp_path / "base.faiss")
    mapped = MappedFlat.read(tmp_path / "base.faiss", "Flat")
    mapped.remove(moved)
    mapped.add(moved, np.ascontiguousarray(x[moved]), stored=True)
    layered = LayeredIVF(VectorStore.from_vectors(np.arange(n), old, "IVF4,Flat", use_gpu=False))
    layered.remove(moved)
    layered.add(moved, np.ascontiguousarray(x[moved]), stored=True)
    return {"flat": VectorStore.from_vectors(np.arange(n), x, "Flat", use_gpu=False),
            "ivf": VectorStore.from_vectors(np.arange(n), x, "IVF4,Flat", use_gpu=False),
            "mapped": mapped, "layered": layered}


def test_codes_of_every_store_kind_cover_exactly_the_live_vectors(tmp_path):
    x = clustered_unit_vectors(400, 16, 6, seed=3)
    for name, store in _stores(x, tmp_path).items():
        codes = QuantizedCodes.from_store(store, chunk=64)
        ids, w, scale, resid = codes.live()
        assert sorted(ids.tolist()) == list(range(400)) and len(codes) == 400, name
        stored = store.reconstruct(ids).astype(np.float64)
        decoded = w.astype(np.float64) * scale.astype(np.float64)[:, None]
        assert np.all(np.linalg.norm(stored - decoded, axis=1) <= resid), name
        np.testing.assert_allclose(stored, x[ids], atol=1e-6, err_msg=name)  # live versions, not dead ones
        assert np.isneginf(codes.scan(x[0])[0][codes.ids < 0]).all(), name  # dead and padding rows
        q = x[7]
        slack = slack_for(1e-6, codes.max_norm)
        got = certified_quantized_search(codes, store.reconstruct, q, 5, 1.0, slack=slack, max_norm=codes.max_norm,
                                         exclude=[7])
        keep = np.arange(400) != 7
        pos, radius, _ = certify_topk_bruteforce(q, stored[np.argsort(ids)][keep], 5, 1.0, slack=slack)
        assert got.exhaustive and got.ids.tolist() == np.arange(400)[keep][pos].tolist(), name
        np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)
    stop = __import__("threading").Event()
    stop.set()
    assert QuantizedCodes.from_store(_stores(x, tmp_path)["flat"], chunk=64, stop=stop) is None


@pytest.fixture()
def small_gallery(tmp_path, tiny_lipsim, monkeypatch):
    from PIL import Image

    import index.gallery
    from index.ingest import IngestOptions, build_index

    monkeypatch.setattr(index.gallery, "QUANTIZED_MIN", 0)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=2, batch_size=30))
    return tmp_path / "index"


def test_a_gallery_with_codes_answers_with_the_exhaustive_certificate(small_gallery, tiny_lipsim):
    from index import Gallery
    from retrieval.search import search_embedding

    with Gallery.open(small_gallery, encoder=tiny_lipsim) as g:
        ids, vecs = g.all_vectors()
        before = search_embedding(g, vecs[5], k=4, exclude=[int(ids[5])])
        assert g.quantized is None and g.prepare_search() is g.quantized is not None
        after = search_embedding(g, vecs[5], k=4, exclude=[int(ids[5])])
        other = search_embedding(g, vecs[9] * 0.5 + vecs[3] * 0.5, k=6)
        bad = vecs[0].copy()
        bad[1] = np.nan
        with pytest.raises(ValueError, match="finite"):  # as the exact scan refuses it
            search_embedding(g, bad, k=3)
    assert before.method == "exhaustive" and after.method == "quantized"
    assert after.exhaustive and after.exact_topk and after.vectors_scanned == len(ids)
    assert [h.id for h in after.hits] == [h.id for h in before.hits]
    np.testing.assert_allclose([h.radius for h in after.hits], [h.radius for h in before.hits], rtol=1e-9)
    assert after.to_dict()["method"] == "quantized"
    keep = np.arange(len(ids)) != 5
    top, radius, _ = certify_topk_bruteforce(vecs[5], vecs[keep], 4, 1.0, slack=after.slack)
    assert [h.id for h in after.hits] == ids[keep][top].tolist()
    q = (vecs[9] * 0.5 + vecs[3] * 0.5).astype(np.float32)
    top, radius, _ = certify_topk_bruteforce(q, vecs, 6, 1.0, slack=other.slack)
    assert other.exhaustive and [h.id for h in other.hits] == ids[top].tolist()
    np.testing.assert_allclose([h.radius for h in other.hits], radius, rtol=1e-9)


def test_a_background_build_is_used_once_ready_and_stopped_by_close(small_gallery, tiny_lipsim):
    from index import Gallery

    with Gallery.open(small_gallery, encoder=tiny_lipsim) as g:
        assert g.prepare_search(background=True) is None or g.quantized is not None
        g._codes_thread.join(30)
        assert g.quantized is not None and len(g.quantized) == len(g)
    g = Gallery.open(small_gallery, encoder=tiny_lipsim)
    g.close()  # closed first: a build started now stops at once and leaves no codes
    assert g._codes_stop.is_set()


def test_a_second_background_call_returns_at_once_and_a_close_during_the_build_keeps_nothing(
        small_gallery, tiny_lipsim, monkeypatch):
    import threading
    import time

    import index.codes
    from index import Gallery

    release = threading.Event()
    real = index.codes.QuantizedCodes.from_store

    def held(store, chunk=None, stop=None, **reuse):  # a build that finishes only when the test says so
        release.wait(30)
        return real(store, chunk, None, **reuse)  # (ignores the stop flag: the close must still win)

    monkeypatch.setattr(index.codes.QuantizedCodes, "from_store", staticmethod(held))
    g = Gallery.open(small_gallery, encoder=tiny_lipsim)
    g.prepare_search(background=True)
    t = time.perf_counter()
    assert g.prepare_search(background=True) is None and time.perf_counter() - t < 1.0  # (review: it waited the build)
    g.close()
    release.set()
    g._codes_thread.join(30)
    assert g.quantized is None  # (review: a build ending after close kept its codes)


def test_a_process_that_exits_during_a_background_build_exits_cleanly(small_gallery):
    # The build is slowed to many small chunks; the interpreter exits while it runs: the exit handler stops it
    # at its next chunk, and the process ends normally (no fatal error from a thread reading torn-down state).
    script = textwrap.dedent(f"""
        import index.codes, index.gallery, index.store
        from index import Gallery
        index.gallery.QUANTIZED_MIN = 0
        index.store.CHUNK_ROWS = 1
        real = index.codes.quantize
        def slow(v):
            import time; time.sleep(0.05); return real(v)
        index.codes.quantize = slow
        g = Gallery.open({str(small_gallery)!r})
        g.prepare_search(background=True)
        print("started", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "started" in done.stdout and "Fatal" not in done.stderr


def test_a_run_of_many_queries_builds_codes_and_a_short_one_does_not(small_gallery, tiny_lipsim):
    from index import Gallery
    from retrieval.bulk import QUANTIZE_QUERIES, QuerySource, run_queries

    for count in (QUANTIZE_QUERIES - 1, QUANTIZE_QUERIES):
        with Gallery.open(small_gallery, encoder=tiny_lipsim) as g:
            ids = [int(i) for i in g.ids()]
            sources = [QuerySource(f"id:{ids[i % len(ids)]}", id=ids[i % len(ids)]) for i in range(count)]
            outcomes = list(run_queries(g, sources, k=3))
            assert all(o.ok for o in outcomes)
            assert (g._codes_thread is not None) == (count >= QUANTIZE_QUERIES)
            if g._codes_thread is not None:
                g._codes_thread.join(30)
                again = list(run_queries(g, sources[:2], k=3))
                assert again[0].result.method == "quantized"
                assert [h.id for h in again[0].result.hits] == [h.id for h in outcomes[0].result.hits]


def _live(*files):
    """A live set: (kind, rows, removed) per file, named and hashed by position and content."""
    return [{"name": f"f{i}", "kind": kind, "sha256": f"h{i}-{rows}-{removed}", "rows": rows, "removed": removed}
            for i, (kind, rows, removed) in enumerate(files)]


def test_common_files_and_where_each_file_s_rows_start():
    from index.layout import BASE, ROWS, common_files, file_starts

    base = (BASE, 100, 0)
    old = _live(base, (ROWS, 10, 0), (ROWS, 5, 0))
    assert common_files(old, _live(base, (ROWS, 10, 0), (ROWS, 5, 0), (ROWS, 7, 0))) == 3  # appended
    assert common_files(old, _live(base, (ROWS, 22, 0))) == 1  # the two segments merged with new rows
    assert common_files(old, _live(base, (ROWS, 10, 0), (ROWS, 9, 2))) == 2
    assert common_files(old, _live((BASE, 122, 0))) == 0  # compacted: a new base
    assert common_files(old, old) == 3 and common_files([], _live(base)) == 0
    assert file_starts(old) == [0, 100, 110, 115] and file_starts([]) == [0]
    unknown = [dict(f, sha256=None) for f in old]  # a file without a recorded SHA-256 is never taken as shared
    assert common_files(unknown, unknown) == 0


def test_a_store_s_row_parts_are_its_files_and_list_its_live_ids():
    from index.mapped import MappedFlat
    from index.mapped_ivf import LayeredIVF
    from index.row_parts import Layout, row_parts
    from index.store import VectorStore

    x = clustered_unit_vectors(60, 8, 3, seed=5)
    mapped = MappedFlat(8)
    mapped.add(np.arange(40), x[:40], stored=True)
    mapped.remove([3, 7])
    mapped.add(np.arange(40, 60), x[40:], stored=True)
    mapped.remove([45, 10])
    layered = LayeredIVF(VectorStore.from_vectors(np.arange(40), x[:40], "IVF4,Flat", use_gpu=False))
    layered.remove([3, 7])
    layered.add(np.arange(40, 60), x[40:], stored=True)
    layered.remove([45, 10])
    for store in (mapped, layered):
        parts, ids, dead, by_file = row_parts(store)
        layout = Layout([len(p) for p in parts], ids, dead)
        assert by_file and layout.starts == [0, 40, 60]
        assert np.array_equal(ids[layout.alive_rows()], store.ids())  # the live ones, in `ids()`'s order
        assert sorted(ids[layout.dead_rows].tolist()) == [3, 7, 10, 45]
        rows = np.concatenate([np.asarray(p[0:len(p)]) for p in parts])
        np.testing.assert_array_equal(rows[layout.alive_rows()], store.reconstruct(store.ids()))
    plain = VectorStore.from_vectors(np.arange(40), x[:40], "Flat", use_gpu=False)
    parts, ids, dead, by_file = row_parts(plain)  # (no files: its live vectors as one part, never shared)
    assert not by_file and [len(p) for p in parts] == [40] and len(dead) == 0


def test_a_part_is_shared_only_where_both_layouts_hold_the_same_rows():
    from index.row_parts import Layout

    older = Layout([4, 3], [10, 11, 12, 13, 20, 21, 22], [1])
    assert older.shares(Layout([4, 3], older.ids, [1]), 0, 4) and older.shares(Layout([4, 3], older.ids, [1]), 1, 7)
    assert Layout([4, 3], older.ids, [1, 2, 5]).shares(older, 0, 7)  # more dead rows in the newer: shared
    assert not Layout([4, 3], older.ids, []).shares(older, 0, 7)  # a row dead in the older alive again
    assert not Layout([4, 3], older.ids, [1]).shares(older, 1, 6)  # past the shared rows
    assert not Layout([4, 4], [*older.ids, 23], [1]).shares(older, 1, 8)  # other bounds
    assert not Layout([4, 3], [10, 12, 11, 13, 20, 21, 22], [1]).shares(older, 0, 7)  # other ids
    assert not Layout([4, 3, 1], [*older.ids, 23], [1]).shares(older, 2, 8)  # a part the older has not
    with pytest.raises(ValueError):
        Layout([4, 4], older.ids, [])


def _add_images(folder, start, count, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")


def _same_codes(got, want):
    for name, a, b in zip(("ids", "codes", "scale", "resid"), got.live(), want.live()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(got.ids, want.ids, err_msg="rows")
    assert got.max_norm >= want.max_norm


def test_a_newer_version_shares_the_codes_of_the_files_it_kept_and_codes_only_the_new_ones(small_gallery, tiny_lipsim):
    from index import Gallery
    from index.ingest import IngestOptions, compact_index, update_index

    opts = IngestOptions(workers=1, batch_size=50)
    folder = small_gallery.parent / "photos"
    g = Gallery.open(small_gallery, encoder=tiny_lipsim)
    g.prepare_search()
    steps = []
    # Size-tiered merging (index/ingest.py): a segment takes in the newest files while they are no larger.
    for change, count in (("append", 6), ("append", 3), ("merge", 9), ("remove", 0), ("compact", 0)):
        _add_images(folder, 60 + 10 * len(steps), count, len(steps))
        if change == "remove":
            (folder / "03.png").unlink()
        if change == "compact":
            compact_index(small_gallery)
        else:
            update_index(small_gallery, encoder=tiny_lipsim, options=opts)
        new = Gallery.open(small_gallery, encoder=tiny_lipsim)
        codes = new.prepare_search(previous=g)
        fresh = QuantizedCodes.from_store(new.store)
        _same_codes(codes, fresh)
        held = [p for p, (a, b) in enumerate(zip(codes.parts, g.quantized.parts)) if a.codes is b.codes]
        assert sum(codes.layout.starts[p + 1] - codes.layout.starts[p] for p in held) == codes.reused  # held once
        steps.append((change, codes.reused, len(g.quantized), len(codes)))
        ids, vecs = new.all_vectors()
        q = vecs[4]
        got = certified_quantized_search(codes, new.vectors, q, 3, 1.0, slack=slack_for(1e-6, codes.max_norm),
                                         max_norm=codes.max_norm)
        pos, radius, _ = certify_topk_bruteforce(q, vecs, 3, 1.0, slack=slack_for(1e-6, codes.max_norm))
        assert got.exhaustive and got.ids.tolist() == ids[pos].tolist()
        np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)
        g.close()
        g = new
    g.close()
    assert [step[1:] for step in steps] == [
        (60, 60, 66), (66, 66, 69),  # appended segments: every older file shared, only the new one coded
        (60, 69, 78),  # the two segments merged with 9 new rows: the base's 60 shared
        (78, 78, 77),  # a tombstone: every file shared (one row of them now dead), nothing coded
        (0, 77, 77)], steps  # a new base: coded again


def _mapped(x, files, dead=()):
    """A MappedFlat of `files` (ids, rows of x) appended in order, then `dead` ids removed."""
    from index.mapped import MappedFlat

    store = MappedFlat(x.shape[1])
    for ids in files:
        store.add(np.asarray(ids), x[np.asarray(ids) % len(x)], stored=True)
    if len(dead):
        store.remove(list(dead))
    return store


def test_an_ivf_base_alone_shares_its_codes_with_the_version_that_layers_a_segment_on_it(tmp_path, tiny_lipsim,
                                                                                          monkeypatch):
    # an IVF base alone opens as a read-only VectorStore over its mapped lists, the next version (a segment) as a
    # LayeredIVF over the same base: before, that first reload (the most common one) coded everything again
    import index.gallery
    import index.store
    from index import Gallery
    from index.ingest import IngestOptions, build_index, update_index
    from index.mapped_ivf import LayeredIVF
    from index.store import VectorStore

    monkeypatch.setattr(index.gallery, "QUANTIZED_MIN", 0)
    monkeypatch.setattr(index.store, "IVF_MIN_POINTS_PER_LIST", 1)
    folder = tmp_path / "photos"
    folder.mkdir()
    _add_images(folder, 0, 20, 1)
    opts = IngestOptions(workers=1, batch_size=50, use_gpu=False)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", index_type="IVF2,Flat", encoder=tiny_lipsim,
                options=opts)
    with Gallery.open(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False) as old:
        assert type(old.store) is VectorStore and old.store.read_only
        old.prepare_search()
        _add_images(folder, 20, 5, 2)
        (folder / "03.png").unlink()
        update_index(tmp_path / "index", encoder=tiny_lipsim, options=opts)
        with Gallery.open(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False) as new:
            assert type(new.store) is LayeredIVF
            codes = new.prepare_search(previous=old)
            assert codes.reused == 20 and codes.parts[0].codes is old.quantized.parts[0].codes and len(codes) == 24
            _same_codes(codes, QuantizedCodes.from_store(new.store))


def test_a_newer_version_shares_a_part_only_where_it_holds_the_same_rows():
    from index.store import VectorStore

    x = clustered_unit_vectors(200, 8, 3, seed=4)
    files = [np.arange(100), np.arange(100, 150)]
    old = QuantizedCodes.from_store(_mapped(x, files, dead=[5]))
    for store, rows, shared in (
            (_mapped(x, files, dead=[5]), 150, 150),  # the same files
            (_mapped(x, [*files, np.arange(150, 170)], dead=[5]), 150, 150),  # a segment appended
            (_mapped(x, files, dead=[5, 9, 120]), 150, 150),  # tombstones on shared rows
            (_mapped(x, files, dead=[5]), 100, 100),  # only the base shared
            (_mapped(x, files, dead=[5]), 149, 100),  # the segment not wholly among the shared rows
            (_mapped(x, files), 150, 50),  # a row dead in the older alive again: the base coded again
            (_mapped(x, [files[0][::-1], files[1]], dead=[5]), 150, 50),  # other ids: coded again
            (_mapped(x, [np.arange(100), np.arange(100, 160)], dead=[5]), 160, 100),  # other bounds
            (_mapped(x, files, dead=[5]), 0, 0)):
        codes = QuantizedCodes.from_store(store, reuse=old, rows=rows)
        assert codes.reused == shared, (rows, shared, codes.reused)
        _same_codes(codes, QuantizedCodes.from_store(store))  # bit for bit what coding them all gives
        same_arrays = [a.codes is b.codes for a, b in zip(codes.parts, old.parts)]  # (held once, not copied)
        assert same_arrays == {150: [True, True], 100: [True, False], 50: [False, True], 0: [False, False]}[shared]
        assert np.isneginf(codes.scan(x[0])[0][codes.ids < 0]).all()
    tomb = QuantizedCodes.from_store(_mapped(x, files, dead=[5, 9]), reuse=old, rows=150)
    assert tomb.parts[0].codes is old.parts[0].codes and tomb.parts[0].resid is not old.parts[0].resid
    assert np.isneginf(tomb.parts[0].resid[[5, 9]]).all() and np.isfinite(old.parts[0].resid[9])  # (older intact)
    assert tomb.parts[1].resid is old.parts[1].resid  # (no new dead row there: nothing new at all)
    moved = x.copy()
    moved[[0, 99]] = moved[[1, 98]]  # the same ids, another first (last) row: refused, though the claim says same
    for r in (0, 99):
        y = x.copy()
        y[r] = moved[r]
        assert QuantizedCodes.from_store(_mapped(y, files, dead=[5]), reuse=old, rows=150).reused == 50, r
    same = VectorStore.from_vectors(np.arange(100), x[:100], "Flat", use_gpu=False)  # parts not files: never
    plain = QuantizedCodes.from_store(same)
    assert not plain.by_file and QuantizedCodes.from_store(same, reuse=plain, rows=100).reused == 0
    assert QuantizedCodes.from_store(_mapped(clustered_unit_vectors(200, 9, 3, seed=4), files, dead=[5]), reuse=old,
                                     rows=150).reused == 0  # another dimension


