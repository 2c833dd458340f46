"""An IVF gallery on torch's GPU (index/mapped_ivf.py's LayeredIVF with a GpuCopy; torch's CPU device stands in for
CUDA) over random histories of segments written to disk: tombstones on base ids and on segment rows, ids removed
and re-added with new vectors, renames, copies (ties), vectors off unit norm, segments removing everything. Each
is opened with `load_live_store` as a reader opens it and checked against a model of the live set and against the
CPU readers: the copy holds exactly the live (id, vector) pairs, M bounds every norm, and every search is a true
top-k (no unlisted item above the k-th listed score plus 2·float32_dot_error)."""
import numpy as np
import pytest

from encoder.certify import float32_dot_error
from index import VectorStore
from index.layout import BASE, ROWS, IndexDir
from index.mapped_ivf import LayeredIVF
from index.segments import load_live_store, write_segment


def _unit(rng, n, dim, scale=False):
    x = rng.standard_normal((n, dim))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if scale:  # not unit norm: M must bound the largest
        x *= rng.uniform(0.5, 1.5, (n, 1))
    return x.astype(np.float32)


def _history(path, seed, dim=12, nlist=4):
    rng = np.random.default_rng(seed)
    nbase = int(rng.integers(nlist * 39, nlist * 39 + 60))
    ids = rng.permutation(10 * nbase)[:nbase].astype(np.int64)
    vecs = _unit(rng, nbase, dim)
    store = VectorStore.from_vectors(ids, vecs, f"IVF{nlist},Flat", use_gpu=False)
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "rows": nbase,
              "sha256": store.write(path / "vectors.00000001.faiss")}]
    live = {int(i): v for i, v in zip(ids, store.reconstruct(ids))}
    counts = [len(live)]  # live items after each file
    removed_ever = []
    next_id = 10 * nbase
    for s in range(int(rng.integers(0, 6))):
        alive = sorted(live)
        mode = rng.integers(6)
        if mode == 0 and alive:
            removed = alive  # everything
        elif alive:
            removed = [int(i) for i in rng.choice(alive, min(len(alive), int(rng.integers(0, 40))), replace=False)]
        else:
            removed = []
        new = list(range(next_id, next_id + int(rng.integers(0, 30))))
        if mode == 0 and rng.random() < 0.5:
            new = []
        next_id += len(new)
        # re-added ids: removed in this segment, or earlier (not live now)
        back = [i for i in removed if rng.random() < 0.3 and not (mode == 0 and not new)]
        back += [i for i in removed_ever if i not in live and i not in removed and rng.random() < 0.3 and new]
        add = new + sorted(set(back))
        add = [int(i) for i in rng.permutation(add)] if add else []
        v = _unit(rng, len(add), dim, scale=bool(rng.integers(2)))
        if len(add) and live and rng.random() < 0.5:
            v[0] = live[sorted(live)[-1]]  # a copy: ties
        for i in removed:
            live.pop(i)
            removed_ever.append(i)
        live.update({i: x for i, x in zip(add, v)})
        name = f"segment.{s + 2:08d}.rows"
        sha, _ = write_segment(path / name, dim, removed, add, v)
        files.append({"name": name, "kind": ROWS, "sha256": sha, "rows": len(add)})
        counts.append(len(live))
    meta = {"version": len(files), "dim": dim, "factory": f"IVF{nlist},Flat", "rows": len(live), "segments": files,
            "params": {"nprobe": 1}}
    return meta, live, counts


@pytest.mark.parametrize("seed", range(40))
def test_layered_gpu_copy_is_the_live_set(tmp_path, stand_in_device, seed):
    meta, live, _ = _history(tmp_path, seed)
    dim = meta["dim"]
    gpu = load_live_store(IndexDir(tmp_path), meta, use_gpu=True, mapped=True)
    cpu = load_live_store(IndexDir(tmp_path), meta, use_gpu=False, mapped=True)
    copying = load_live_store(IndexDir(tmp_path), meta, use_gpu=False)
    assert isinstance(gpu, LayeredIVF) and gpu.gpu is not None
    assert len(gpu) == len(live) == len(copying) == len(cpu)
    if not live:
        assert not gpu.on_gpu and gpu.max_norm() == 1.0
        return
    assert gpu.on_gpu, (gpu.gpu.failed,)
    copy = gpu.gpu.copy
    alive = copy.alive_rows()  # (the copy holds every stored row, one part a file; removed ones are dead)
    assert len(alive) == len(set(copy.ids[alive].tolist())) == len(live)
    assert set(copy.ids[alive].tolist()) == set(live)
    assert np.array_equal(copy.ids[alive], gpu.ids())
    rows = copy.host_rows()[alive]
    want = np.stack([live[int(i)] for i in copy.ids[alive]])
    assert np.array_equal(rows, want)
    assert len(copy.parts) == len([f for f in meta["segments"] if f["rows"]]) + (meta["segments"][0]["rows"] == 0)
    norms = np.linalg.norm(want.astype(np.float64), axis=1)
    assert norms.max() <= gpu.max_norm() <= norms.max() * (1 + 1e-5)
    assert cpu.max_norm() >= norms.max() if isinstance(cpu, LayeredIVF) else True
    all_ids = np.array(sorted(live), np.int64)
    allv = np.stack([live[int(i)] for i in all_ids]).astype(np.float64)
    rng = np.random.default_rng(seed + 1000)
    q = _unit(rng, 6, dim)
    q[0] = live[int(all_ids[0])]  # a stored vector
    for k in (1, 3, 17, len(live), len(live) + 5):
        s, i = gpu.search(q, k, exact=True)
        s2, i2 = gpu.search(q, k)  # (not exact: on the GPU, exhaustive too)
        assert np.array_equal(i, i2)
        sc, ic = cpu.search(q, k, exact=True)
        for r in range(len(q)):
            got = i[r][i[r] >= 0]
            assert len(got) == min(k, len(live)) and len(set(got.tolist())) == len(got)
            assert np.isin(got, all_ids).all()
            exact = allv @ q[r].astype(np.float64)
            gamma = float32_dot_error(dim, float(norms.max()), 1.0 + 1e-6)
            listed = exact[np.searchsorted(all_ids, got)]
            assert np.all(np.abs(s[r][:len(got)] - listed) <= gamma)
            rest = np.setdiff1d(all_ids, got)
            if len(rest):
                assert exact[np.searchsorted(all_ids, rest)].max() <= s[r][len(got) - 1] + 2 * gamma
            assert set(ic[r][ic[r] >= 0].tolist()) <= set(live)
            # the CPU fallback (exact=True) is a valid top-k too
            gotc = ic[r][ic[r] >= 0]
            assert len(gotc) == min(k, len(live)) and len(set(gotc.tolist())) == len(gotc)
            restc = np.setdiff1d(all_ids, gotc)
            if len(restc):
                assert exact[np.searchsorted(all_ids, restc)].max() <= sc[r][len(gotc) - 1] + 2 * gamma
            # and the GPU store's own CPU fallback (copy not usable) answers the same as the CPU store
            g, gpu.gpu = gpu.gpu, None
            try:
                assert np.array_equal(gpu.search(q[r:r + 1], k, exact=True)[1][0], ic[r])
            finally:
                gpu.gpu = g
    # the Gallery-level view
    assert np.array_equal(gpu.reconstruct(copy.ids[alive]), want)


@pytest.mark.parametrize("seed", range(40))
def test_a_newer_versions_gpu_copy_shares_the_files_it_has_in_common(tmp_path, stand_in_device, seed):
    # the version before the last segment, then the last: the newer copy shares the older one's parts of the files
    # both hold (Gallery._seed_gpu's rule: the rows before the first file they do not share) and answers as a copy
    # made in full; the tombstones of the last segment (on base ids, on older segments' rows) are dead rows there
    from index.layout import common_files, file_starts

    meta, live, counts = _history(tmp_path, seed)
    files = meta["segments"]
    if len(files) < 2 or not live:
        pytest.skip("a history of one file, or nothing live")
    before = {**meta, "segments": files[:-1], "version": meta["version"] - 1, "rows": counts[-2]}
    older = load_live_store(IndexDir(tmp_path), before, use_gpu=True, mapped=True)
    newer = load_live_store(IndexDir(tmp_path), meta, use_gpu=True, mapped=True)
    fresh = load_live_store(IndexDir(tmp_path), meta, use_gpu=True, mapped=True)
    if not older.ntotal:
        pytest.skip("nothing live in the older version")
    assert older.on_gpu
    common = common_files(files[:-1], files)
    assert common == len(files) - 1
    newer.gpu.seed(older.gpu, file_starts(files)[common])
    assert newer.on_gpu and fresh.on_gpu
    a, b, o = newer.gpu.copy, fresh.gpu.copy, older.gpu.copy
    shared = [p for p in a.parts if any(p is x for x in o.parts)]
    assert a.reused == sum(len(p) for p in shared) == file_starts(files)[common] and b.reused == 0
    assert np.array_equal(a.host_rows(), b.host_rows()) and np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.dead_rows, b.dead_rows)
    assert a.max_norm >= b.max_norm == fresh.max_norm()  # (a shared part's bound: over the older version's live rows)
    norms = np.linalg.norm(np.stack(list(live.values())).astype(np.float64), axis=1)
    assert norms.max() <= a.max_norm == newer.max_norm()
    q = _unit(np.random.default_rng(seed + 2000), 5, meta["dim"])
    for k in (1, 4, len(live) + 2):
        for x, y in zip(newer.search(q, k), fresh.search(q, k)):
            assert np.array_equal(x, y)
