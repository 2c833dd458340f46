"""A mapped Flat gallery searched on a GPU through torch (index/gpu_scan.py, index/mapped.py).

Without a GPU the same code runs on torch's CPU device (`scan_device` replaced by a stand-in returning it):
every line of `DeviceRows` and of MappedFlat's GPU path runs, with torch's CPU matrix products in place of
cuBLAS. Where torch sees CUDA, the last tests run on it. benchmarks/gpu_paths.py checks more on a lent GPU
(the premise of every certificate against float64 scores of whole 1M/10M galleries, latencies)."""
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import index.gpu_scan as gpu_scan
from _index_fixtures import round_tf32, unit_rows
from encoder.certify import float32_dot_error
from index.gpu_scan import DeviceRows
from index.mapped import MappedFlat
from index.store import scan_top

DIM = 33


def _blocks(v, sizes):
    out, at = [], 0
    for s in sizes:
        out.append(v[at:at + s])
        at += s
    return out


def _cpu_scan(blocks, ids, dead, q, k):
    import faiss

    return scan_top(q, k, blocks[0].shape[1], [(faiss.swig_ptr(b), len(b)) for b in blocks], ids, dead)


@pytest.mark.parametrize("k", [1, 10, 74, 700])
def test_device_rows_answer_the_cpu_scans_ids_in_its_order_with_scores_within_the_float32_bound(k):
    v = unit_rows(600, seed=k)
    v[100:140] = v[7]  # 41 equal rows: ties at every k around them, across a block boundary
    ids = np.arange(1000, 1600, dtype=np.int64)[::-1].copy()
    dead = np.array([3, 7, 120, 599], np.int64)
    blocks = _blocks(v, [250, 0, 350])
    q = np.vstack([unit_rows(5, seed=99 + k), v[7:8], v[120:121]])
    rows = DeviceRows([b for b in blocks if len(b)], ids, dead, "cpu", DIM)
    s_gpu, i_gpu, r_gpu = rows.top(q, k)
    s_cpu, i_cpu, r_cpu = _cpu_scan([b for b in blocks if len(b)], ids, dead, q, k)
    take = min(k, 600 - len(dead))
    assert r_gpu.shape == (len(q), take)
    # the path's own float32 scores, computed as it computes them (one matrix product a part for the batch), then
    # `index.store._select`'s rule applied independently: live rows by (−score, row), the first `take`
    own = np.hstack([(torch.from_numpy(q) @ torch.from_numpy(b).T).numpy() for b in blocks if len(b)])
    for r in range(len(q)):
        live = np.setdiff1d(np.arange(600), dead)
        rule = sorted(live, key=lambda j: (-float(own[r, j]), j))[:take]
        assert r_gpu[r].tolist() == rule and np.array_equal(s_gpu[r, :take], own[r, rule])
        exact = v[r_gpu[r]].astype(np.float64) @ q[r].astype(np.float64)
        assert np.all(np.abs(s_gpu[r, :take] - exact) <= float32_dot_error(DIM, 1.0 + 1e-6, 1.0 + 1e-6))
        assert not np.isin(r_gpu[r], dead).any()
        # the same rows in the same order wherever both scored equal rows equally (here: always, as a check of
        # the order rule; both sum 33 float32 products, a different order could round a tie apart)
        if np.array_equal(s_gpu[r], s_cpu[r]):
            assert np.array_equal(i_gpu[r], i_cpu[r]) and np.array_equal(r_gpu[r], r_cpu[r])
        # the order rule itself, independently: decreasing score, increasing row among equal scores
        key = list(zip(-s_gpu[r, :take].astype(np.float64), r_gpu[r]))
        assert key == sorted(key)
        # and nothing left out beats or ties-below-row the last one taken
        all_scores = (v.astype(np.float64) @ q[r].astype(np.float64))
        left = np.setdiff1d(np.setdiff1d(np.arange(600), r_gpu[r]), dead)
        bound = 2 * float32_dot_error(DIM, 1.0 + 1e-6, 1.0 + 1e-6)
        assert np.all(all_scores[left] <= exact.min() + bound)
    assert np.all(i_gpu[:, take:] == -1) and np.all(s_gpu[:, take:] == -np.finfo(np.float32).max)


def test_ties_at_the_kth_score_go_to_the_lowest_rows():
    v = np.zeros((300, 4), np.float32)
    v[:, 0] = 1.0  # every row the same: every score ties
    rows = DeviceRows([v], np.arange(300) * 10, np.array([0, 5], np.int64), "cpu", 4)
    s, ids, r = rows.top(np.array([[1, 0, 0, 0]], np.float32), 6)
    assert r.tolist() == [[1, 2, 3, 4, 6, 7]] and ids.tolist() == [[10, 20, 30, 40, 60, 70]]


def test_a_batch_larger_than_a_tile_answers_as_one_query_at_a_time(monkeypatch):
    v = unit_rows(400, seed=3)
    rows = DeviceRows(_blocks(v, [150, 250]), np.arange(400), np.array([9], np.int64), "cpu", DIM)
    q = unit_rows(23, seed=4)
    monkeypatch.setattr(gpu_scan, "TILE_SCORES", 400 * 5)  # 5 queries a product
    batch = rows.top(q, 12)
    one = [np.concatenate(part) for part in zip(*(rows.top(q[i:i + 1], 12) for i in range(len(q))))]
    assert np.array_equal(batch[1], one[1]) and np.array_equal(batch[2], one[2])
    # (a matrix-vector product and a matrix product may sum in different orders: both within the bound)
    assert np.abs(batch[0] - one[0]).max() <= 2 * float32_dot_error(DIM, 1.0 + 1e-6, 1.0 + 1e-6)


def test_fewer_live_rows_than_k_pad_with_minus_one():
    v = unit_rows(5, seed=5)
    rows = DeviceRows([v], np.arange(5), np.array([1, 2], np.int64), "cpu", DIM)
    s, ids, r = rows.top(v[:1], 8)
    assert sorted(ids[0, :3].tolist()) == [0, 3, 4] and ids[0, 0] == 0  # (row 0 is the query itself)
    assert np.all(ids[0, 3:] == -1) and np.all(s[0, 3:] == -np.finfo(np.float32).max) and r.shape == (1, 3)


def test_dead_rows_named_twice_count_once():
    # (review) the live count was n − len(dead) without removing repeats: a row was left out
    rows = DeviceRows([np.eye(4, dtype=np.float32)], np.arange(4), np.array([1, 1]), "cpu", 4)
    got = rows.top(np.ones((1, 4), np.float32), 4)
    assert got[1].tolist() == [[0, 2, 3, -1]]


def _mapped(v, ids, use_gpu=True, dead=()):
    store = MappedFlat(v.shape[1], use_gpu=use_gpu)
    store.add(ids[:300], v[:300], stored=True)
    store.add(ids[300:], v[300:], stored=True)
    if len(dead):
        store.remove(dead)
    return store


def test_a_mapped_gallery_searches_on_the_gpu_and_answers_as_on_the_cpu(stand_in_device):
    v = unit_rows(700, seed=6)
    ids = np.random.default_rng(6).permutation(10_000)[:700].astype(np.int64)
    gpu, cpu = _mapped(v, ids, dead=ids[[4, 400]]), _mapped(v, ids, use_gpu=False, dead=ids[[4, 400]])
    assert gpu.on_gpu and not cpu.on_gpu
    q = unit_rows(30, seed=7)
    for batch in (q[:1], q[:5], q):  # one query, a few (the CPU's scan), many (FAISS's batched search)
        a, b = gpu.search(batch, 20), cpu.search(batch, 20)
        assert np.array_equal(a[1], b[1])
        assert np.abs(a[0] - b[0]).max() <= 2 * float32_dot_error(DIM, 1.0 + 1e-6, 1.0 + 1e-6)
    # what certifying the answer reads next: its vectors, from the recent answers' rows
    found = gpu.search(q[:1], 74)[1][0]
    assert set(gpu._recent) >= set(found.tolist())
    assert np.array_equal(gpu.reconstruct(found), cpu.reconstruct(found))


def test_a_gpu_copy_gives_the_same_norm_bound_as_a_pass_over_the_mapped_rows(stand_in_device):
    v = unit_rows(700, seed=15) * np.random.default_rng(15).uniform(0.5, 1.5, (700, 1)).astype(np.float32)
    store, cpu = _mapped(v, np.arange(700)), _mapped(v, np.arange(700), use_gpu=False)
    assert store.on_gpu and store.max_norm() == cpu.max_norm() >= np.linalg.norm(v.astype(np.float64), axis=1).max()
    # the row of largest norm cleared: the copy still holds it, so its bound would not be this store's tightest
    dead = _mapped(v, np.arange(700), dead=[int(np.argmax(np.linalg.norm(v, axis=1)))])
    assert dead.on_gpu and dead.max_norm() < store.max_norm()


def test_a_gpu_scoring_in_reduced_precision_is_not_used(stand_in_device, monkeypatch, caplog):
    true_top = DeviceRows.top

    def tf32_top(self, q, k):
        return true_top(self, round_tf32(q), k)

    monkeypatch.setattr(DeviceRows, "top", tf32_top)
    v = unit_rows(500, seed=8)
    store = _mapped(v, np.arange(500))
    with caplog.at_level(logging.WARNING):
        assert not store.on_gpu
    assert "float32 error bound" in caplog.text
    assert np.array_equal(store.search(v[:3], 5)[1], _mapped(v, np.arange(500), use_gpu=False).search(v[:3], 5)[1])


def test_the_check_also_probes_one_query_at_a_time(stand_in_device, monkeypatch):
    # a search of one query runs a matrix-vector product, a batch a matrix product: another kernel, which could
    # compute in another precision; a check that probed only the batch would have passed this one
    true_top = DeviceRows.top

    def tf32_when_alone(self, q, k):
        return true_top(self, round_tf32(q) if len(q) == 1 else q, k)

    monkeypatch.setattr(DeviceRows, "top", tf32_when_alone)
    assert not _mapped(unit_rows(500, seed=8), np.arange(500)).on_gpu


def test_searches_run_on_the_cpu_while_another_thread_makes_the_copy(stand_in_device, monkeypatch):
    # a server's reload makes the new version's copy on a background thread (Gallery.prepare_search): requests meanwhile
    # must not wait seconds for it (before: every search waited on the copy's lock)
    started, release = threading.Event(), threading.Event()
    true_init = DeviceRows.__init__

    def slow_init(self, *args, **kwargs):
        started.set()
        release.wait(20)
        true_init(self, *args, **kwargs)

    monkeypatch.setattr(DeviceRows, "__init__", slow_init)
    v = unit_rows(500, seed=14)
    store, cpu = _mapped(v, np.arange(500)), _mapped(v, np.arange(500), use_gpu=False)
    maker = threading.Thread(target=lambda: store.on_gpu)
    maker.start()
    try:
        assert started.wait(10)
        done = []
        searcher = threading.Thread(target=lambda: done.append(store.search(v[:2], 3)))
        searcher.start()
        searcher.join(5)
        assert done, "the search waited for the copy"
        assert np.array_equal(done[0][1], cpu.search(v[:2], 3)[1])
    finally:
        release.set()
        maker.join(20)
    assert store.gpu.ready and store.on_gpu


def test_a_search_that_fails_on_the_gpu_runs_on_the_cpu_and_repeated_failures_stay_there(stand_in_device,
                                                                                          monkeypatch, caplog):
    # (review) one failed search (out of memory for its scores, say) used to send the gallery to the CPU for good
    from index.gpu_scan import GPU_ERRORS_MAX

    v = unit_rows(500, seed=9)
    store, cpu = _mapped(v, np.arange(500)), _mapped(v, np.arange(500), use_gpu=False)
    assert store.on_gpu
    true_top, fail = DeviceRows.top, {"left": 1}

    def sometimes_out_of_memory(self, q, k):
        if fail["left"] > 0:
            fail["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return true_top(self, q, k)

    monkeypatch.setattr(DeviceRows, "top", sometimes_out_of_memory)
    with caplog.at_level(logging.WARNING):
        got = store.search(v[:2], 4)
    assert "out of memory" in caplog.text and store.on_gpu  # this search on the CPU, the next ones on the GPU
    assert np.array_equal(got[1], cpu.search(v[:2], 4)[1])
    assert np.array_equal(store.search(v[:2], 4)[1], got[1]) and fail["left"] == 0
    fail["left"] = GPU_ERRORS_MAX
    for _ in range(GPU_ERRORS_MAX):
        assert np.array_equal(store.search(v[:2], 4)[1], got[1])
    assert not store.on_gpu


def test_no_gpu_device_means_the_cpu_without_importing_torch():
    if any(__import__("os").path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd")):
        pytest.skip("a GPU device node exists here")
    code = ("import sys, index.gpu_scan as g, index.mapped; assert g.scan_device() is None; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_flat_gallery_opened_on_a_gpu_is_mapped_searched_there_and_builds_no_codes(stand_in_device, photo_index,
                                                                                     tiny_lipsim, monkeypatch):
    import index.gallery as gallery_mod
    from index.gallery import Gallery
    from retrieval.search import search_embedding

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True) as on_gpu, \
            Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=False) as on_cpu:
        assert on_gpu.prepare_search(background=True) is None  # the copy is made on the builder's thread instead
        on_gpu._codes_thread.join(20)
        assert on_gpu.store.gpu.ready and on_gpu.quantized is None
        assert isinstance(on_gpu.store, MappedFlat) and on_gpu.store.on_gpu and not on_cpu.store.on_gpu
        assert on_gpu.prepare_search() is None and on_cpu.prepare_search() is not None  # (a GPU scans the float32 rows)
        ids, vecs = on_cpu.all_vectors()
        for i in (0, 3):
            q = vecs[i] + np.float32(0.05) * unit_rows(1, seed=i, dim=len(vecs[i]))[0]
            q /= np.linalg.norm(q)
            a, b = search_embedding(on_gpu, q, 3), search_embedding(on_cpu, q, 3)
            assert a.method == "exhaustive" and b.method == "quantized"
            assert [h.id for h in a.hits] == [h.id for h in b.hits]
            assert np.allclose([h.radius for h in a.hits], [h.radius for h in b.hits], rtol=1e-6)


def test_an_ivf_gallery_keeps_its_codes_when_faiss_sees_a_gpu(tiny_lipsim, sample_folder, tmp_path, monkeypatch):
    # (review) the skip of codes on a GPU also hit IVF galleries on FAISS's GPU, whose certified queries run on
    # the CPU (certified IVF): they lost their codes
    import faiss

    import index.gallery as gallery_mod
    import index.store as store_mod
    from index import IngestOptions, build_index
    from index.gallery import Gallery
    from retrieval.search import search_embedding

    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    build_index(sample_folder, tmp_path / "index", "lipsim:cpu-tiny", index_type="IVF2,Flat", encoder=tiny_lipsim,
                options=IngestOptions(workers=1, use_gpu=False))
    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, device, index: faiss.clone_index(index), raising=False)
    with Gallery.open(tmp_path / "index", encoder=tiny_lipsim, use_gpu=True) as g:
        assert g.store.kind == "ivf" and g.store.on_gpu
        assert g.prepare_search() is not None
        assert search_embedding(g, g.all_vectors()[1][0], 3).method == "quantized"


def test_an_ivf_gallery_with_segments_is_searched_on_torchs_gpu_with_the_cpus_certificates(
        stand_in_device, tiny_lipsim, sample_folder, tmp_path, monkeypatch):
    # an IVF gallery ("auto" picks IVF from 1M vectors) where torch sees a GPU and FAISS does not: every live vector
    # (the base's lists minus tombstones, then the segments' rows) on the GPU, searched exhaustively there
    import os

    import index.gallery as gallery_mod
    import index.store as store_mod
    from _index_fixtures import copy_photos
    from index import IngestOptions, build_index, update_index
    from index.gallery import Gallery
    from index.mapped_ivf import LayeredIVF
    from PIL import Image
    from retrieval.search import search_embedding

    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    folder = copy_photos(sample_folder, tmp_path / "photos")
    opts = IngestOptions(workers=1, use_gpu=False, merge_tiers=False)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", index_type="IVF2,Flat", encoder=tiny_lipsim,
                options=opts)
    os.remove(folder / "rocket.png")  # a tombstone in the base
    os.rename(folder / "moon.png", folder / "moon-renamed.png")  # a tombstone and a new id
    with Image.open(folder / "coins.png") as im:
        im.rotate(90).save(folder / "coins.png")  # a tombstone, and its id's new vector in a segment
    update_index(tmp_path / "index", encoder=tiny_lipsim, options=opts)
    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    with Gallery.open(tmp_path / "index", encoder=tiny_lipsim, use_gpu=True) as on_gpu, \
            Gallery.open(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False) as on_cpu:
        assert isinstance(on_gpu.store, LayeredIVF) and on_gpu.store.rows.ntotal > 0
        assert on_gpu.store.on_gpu, (on_gpu.store.gpu.failed, on_gpu.store.gpu.errors)
        assert on_gpu.prepare_search() is None and on_gpu.certified_ivf is None
        assert on_cpu.certified_ivf is not None
        ids, vecs = on_cpu.all_vectors()
        copy = on_gpu.store.gpu.copy
        alive = copy.alive_rows()
        assert sorted(copy.ids[alive].tolist()) == sorted(ids.tolist())
        norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
        assert norms.max() <= on_gpu.max_norm <= norms.max() * (1 + 1e-5)
        assert np.array_equal(copy.host_rows()[alive], on_cpu.vectors(copy.ids[alive]))
        calls = []
        true_top = DeviceRows.top
        monkeypatch.setattr(DeviceRows, "top", lambda self, q, k: calls.append(k) or true_top(self, q, k))
        for i in range(len(ids)):
            q = vecs[i] + np.float32(0.05) * unit_rows(1, seed=i, dim=vecs.shape[1])[0]
            q /= np.linalg.norm(q)
            # (a list of 5 of the 10 items: the GPU's answer is what the certificate rests on, not a full rescoring)
            a, b = search_embedding(on_gpu, q, 3, candidates=5), search_embedding(on_cpu, q, 3)
            assert a.method == "exhaustive" and b.method == "certified-ivf"
            assert [h.id for h in a.hits] == [h.id for h in b.hits]
            assert all(ha.radius <= hb.radius * (1 + 1e-6) for ha, hb in zip(a.hits, b.hits))  # a shorter list
        assert calls == [5] * len(ids)


def test_a_gallery_whose_gpu_fails_its_check_builds_codes_for_the_cpu(stand_in_device, photo_index, tiny_lipsim,
                                                                      monkeypatch):
    import index.gallery as gallery_mod
    from index.gallery import Gallery

    true_top = DeviceRows.top
    monkeypatch.setattr(DeviceRows, "top", lambda self, q, k: true_top(self, q + np.float32(1e-3) * np.abs(q), k))
    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True) as g:
        assert g.prepare_search() is not None and not g.store.on_gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_real_gpu_scores_stay_within_the_float32_bound_and_answers_match_the_cpu():
    from index.store import gpu_arithmetic_ratio

    v = unit_rows(200_000, seed=12, dim=129)
    store = MappedFlat(129, use_gpu=True)
    store.add(np.arange(len(v)), v, stored=True)
    assert store.on_gpu
    assert gpu_arithmetic_ratio(store.gpu.copy, store) <= 1
    cpu = MappedFlat(129)
    cpu.add(np.arange(len(v)), v, stored=True)
    q = unit_rows(50, seed=13, dim=129)
    a, b = store.search(q, 74), cpu.search(q, 74)
    gamma = float32_dot_error(129, 1.0 + 1e-6, 1.0 + 1e-6)
    assert np.abs(a[0] - b[0]).max() <= 2 * gamma
    for r in range(len(q)):  # lists differ only where two summation orders can swap near-equal last items
        exact = v.astype(np.float64) @ q[r].astype(np.float64)
        differ = np.setxor1d(a[1][r], b[1][r])
        assert np.all(np.abs(exact[differ] - exact[b[1][r][-1]]) <= 4 * gamma)
