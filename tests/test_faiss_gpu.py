"""FAISS on the GPU (index/store.py): the CPU fallbacks for what a GPU copy cannot answer soundly, and, where
FAISS sees a GPU, the real thing. benchmarks/gpu_paths.py (section 5) checks more on a lent GPU: the premise of
every exact-list certificate against float64 scores of whole 1M/10M galleries, latencies, IVF.

Without a GPU, `faiss.index_cpu_to_gpu` is replaced by a stand-in with the GPU copy's two relevant traits as
measured on an H200 (faiss-gpu 1.15.1): it refuses k > 2048 ("GPU index only supports min/max-K selection k
<= 2048"), and it scores either in float32 or, for the reduced-precision case, in TF32."""
import logging

import faiss
import numpy as np
import pytest

from _index_fixtures import round_tf32
from encoder.certify import float32_dot_error
from index.store import GPU_MAX_K, VectorStore, gpu_arithmetic_ratio

DIM = 33


def _unit(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class StandInGpuIndex:
    """What `index_cpu_to_gpu` returns, on a machine without a GPU (module doc)."""

    def __init__(self, store: VectorStore, tf32: bool = False):
        ids = store.ids()
        vectors = store.reconstruct(ids)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(store.dim))
        self.index.add_with_ids(round_tf32(vectors) if tf32 else vectors, ids)
        self.tf32, self.calls = tf32, 0

    def search(self, q, k):
        self.calls += 1
        if k > GPU_MAX_K:
            raise RuntimeError("Error: 'k > 0 && k <= getMaxKSelection(use_cuvs)' failed: GPU index only supports "
                               "min/max-K selection k <= 2048")
        return self.index.search(round_tf32(q) if self.tf32 else q, k)


@pytest.fixture
def stand_in_gpu(monkeypatch):
    made = []

    def to_gpu(res, device, index, tf32=False):
        made.append(StandInGpuIndex(to_gpu.store, tf32=to_gpu.tf32))
        return made[-1]

    to_gpu.tf32 = False
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    to_gpu.made = made
    return to_gpu


def test_the_arithmetic_ratio_is_the_largest_error_over_the_float32_bound():
    store = VectorStore.from_vectors(np.arange(500), _unit(500), "Flat", use_gpu=False)
    exact = gpu_arithmetic_ratio(store.index, store)
    assert 0 <= exact <= 1
    rounded = StandInGpuIndex(store, tf32=True)
    ratio = gpu_arithmetic_ratio(rounded, store)
    # independently: the same probes (every ⌊i·499/31⌋-th stored vector, perturbed and renormalised; and with
    # each coordinate's 13 low mantissa bits made 0x0FFF), TF32 scores
    ids = store.ids()
    pick = store.reconstruct(ids[np.linspace(0, len(ids) - 1, 32).astype(np.int64)])
    q = pick.astype(np.float64) + 0.01 * np.cos(np.arange(pick.size, dtype=np.float64)).reshape(pick.shape)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    edge = np.array([[np.frombuffer(((int(np.float32(c).view(np.uint32)) & ~0x1FFF) | 0x0FFF).to_bytes(4, "little"),
                                    np.float32)[0] for c in row] for row in pick], np.float32)
    q = np.vstack([q, edge])
    scores, found = rounded.search(q, 8)
    worst = {"random": 0.0, "edge": 0.0}
    for r in range(64):
        e = store.reconstruct(found[r]).astype(np.float64)
        bound = np.array([float32_dot_error(DIM, np.linalg.norm(v), np.linalg.norm(q[r])) for v in e])
        which = "random" if r < 32 else "edge"
        worst[which] = max(worst[which], float(np.max(np.abs(scores[r] - e @ q[r].astype(np.float64)) / bound)))
    assert ratio == pytest.approx(max(worst.values()), rel=1e-12)
    assert worst["random"] > 10  # TF32 is ~2^-11 relative: far outside γ_D ≈ 34·2^-24
    assert worst["edge"] > 0.5 * 4096 / (DIM + 1)  # the edge probes' coherent error (the function's docstring)


@pytest.mark.parametrize("dim", [768, 1792])
def test_tf32_is_caught_at_wide_embeddings_where_random_probes_alone_missed_it(dim):
    # A second reader found TF32 accepted at D = 768–1792 (ratio 0.38–0.74 on random probes, while 13–17 of
    # 800,000 scores broke the bound): the edge probes' error is coherent, ~4096/(D + 1) times the bound.
    v = np.random.default_rng(dim).standard_normal((300, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    store = VectorStore.from_vectors(np.arange(300), v, "Flat", use_gpu=False)
    assert gpu_arithmetic_ratio(store.index, store) <= 1  # float32 itself passes at every width
    assert gpu_arithmetic_ratio(StandInGpuIndex(store, tf32=True), store) > 1.5


def test_a_search_deeper_than_the_gpu_selects_runs_on_the_cpu(stand_in_gpu):
    v = _unit(3000)
    store = VectorStore.from_vectors(np.arange(3000) * 7, v, "Flat", use_gpu=True)
    stand_in_gpu.store = store
    assert store.on_gpu
    q = _unit(2, seed=1)
    calls = stand_in_gpu.made[0].calls
    scores, ids = store.search(q, GPU_MAX_K + 1, exact=True)  # raised FAISS's error before the fallback
    assert stand_in_gpu.made[0].calls == calls  # the GPU copy was not asked
    cpu = VectorStore.from_vectors(np.arange(3000) * 7, v, "Flat", use_gpu=False)
    ref_scores, _ = cpu.search(q, GPU_MAX_K + 1, exact=True)
    assert np.array_equal(scores, ref_scores) and ids.shape == (2, GPU_MAX_K + 1)
    store.search(q, 10)
    assert stand_in_gpu.made[0].calls == calls + 1  # a shallow search still goes to the GPU


def test_a_gpu_scoring_in_reduced_precision_is_not_used(stand_in_gpu, caplog):
    stand_in_gpu.tf32 = True
    store = VectorStore.from_vectors(np.arange(400), _unit(400), "Flat", use_gpu=True)
    stand_in_gpu.store = store
    with caplog.at_level(logging.WARNING, logger="index.store"):
        assert not store.on_gpu
    assert "float32 error bound" in caplog.text
    q = _unit(3, seed=2)
    cpu = VectorStore.from_vectors(np.arange(400), _unit(400), "Flat", use_gpu=False)
    assert np.array_equal(store.search(q, 20)[0], cpu.search(q, 20)[0])


def test_concurrent_first_searches_make_one_gpu_copy(stand_in_gpu, monkeypatch):
    # A server's threads all search right after a reload: each used to make its own GPU copy (8 copies of the
    # gallery in GPU memory at once; one running out of memory then marked the store failed for good).
    import threading

    store = VectorStore.from_vectors(np.arange(2000), _unit(2000), "Flat", use_gpu=True)
    stand_in_gpu.store = store
    slow = stand_in_gpu

    def to_gpu(res, device, index):
        copy = StandInGpuIndex(store)
        threading.Event().wait(0.05)  # copying takes a while
        slow.made.append(copy)
        return copy

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    q = _unit(8, seed=4)
    threads = [threading.Thread(target=store.search, args=(q[i:i + 1], 10)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(slow.made) == 1 and store.on_gpu


def test_a_copy_made_while_the_store_changed_is_not_kept(stand_in_gpu, monkeypatch):
    # add() during the copy (and its arithmetic check) left the older copy installed: a search then missed the
    # vector just added.
    v = _unit(500)
    store = VectorStore.from_vectors(np.arange(500), v, "Flat", use_gpu=True)
    stand_in_gpu.store = store
    new = _unit(1, seed=9)

    def to_gpu(res, device, index):
        copy = StandInGpuIndex(store)
        store.add(np.array([99_999]), new)  # a writer's change lands while the copy is checked
        return copy

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    scores, ids = store.search(new, 1)
    assert ids[0, 0] == 99_999 and store.gpu_index is None


def test_a_copy_made_during_a_removal_is_not_kept(stand_in_gpu):
    # A second reader's race: remove() dropped the GPU copy before removing, so a reader's first search in
    # between copied the index with the id still in it and kept that copy: the removed id kept coming back.
    import threading

    v = _unit(500)
    store = VectorStore.from_vectors(np.arange(500), v, "Flat", use_gpu=True)
    stand_in_gpu.store = store
    dropped, go = threading.Event(), threading.Event()
    drop = store._drop_gpu

    def slow_drop():  # the writer is descheduled right after dropping the copy
        drop()
        dropped.set()
        go.wait(10)

    store._drop_gpu = slow_drop
    writer = threading.Thread(target=store.remove, args=([7],))
    writer.start()
    dropped.wait(10)
    store.search(v[7:8], 1)  # a reader's first search copies the index now, id 7 still in it
    go.set()
    writer.join()
    scores, ids = store.search(v[7:8], 1)
    assert ids[0, 0] != 7 and store.ntotal == 499


def test_an_ivf_probing_more_lists_than_the_gpu_allows_stays_on_the_cpu_without_giving_up_the_gpu(stand_in_gpu,
                                                                                                  monkeypatch):
    # FAISS's GPU IVF refuses nprobe > 2048 when copied; that used to mark the store failed for good, so lowering
    # nprobe afterwards still searched on the CPU.
    store = VectorStore.from_vectors(np.arange(1000), _unit(1000), "IVF16,Flat", use_gpu=True)
    stand_in_gpu.store = store
    real = faiss.index_cpu_to_gpu

    def to_gpu(res, device, index):
        if faiss.extract_index_ivf(index).nprobe > GPU_MAX_K:
            raise RuntimeError("Error: 'nprobe <= getMaxKSelection(use_cuvs)' failed")
        return real(res, device, index)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    store.set_params(nprobe=GPU_MAX_K + 1)
    assert not store.on_gpu and not store._gpu_failed
    store.set_params(nprobe=8)
    assert store.on_gpu


gpu = pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")


@gpu
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_a_gpu_copy_scores_within_the_float32_bound_and_answers_deep_searches(factory):
    v = _unit(4000)
    store = VectorStore.from_vectors(np.arange(4000), v, factory, use_gpu=True)
    assert store.on_gpu
    assert gpu_arithmetic_ratio(store.gpu_index, store) <= 1
    cpu = VectorStore(store.index, store.factory, store.params, use_gpu=False)
    q = _unit(20, seed=3)
    a, b = store.search(q, 10), cpu.search(q, 10)
    assert np.abs(a[0] - b[0]).max() < 2 * float32_dot_error(DIM, 1.0 + 1e-6)
    deep = store.search(q[:2], GPU_MAX_K + 1, exact=True)
    assert deep[1].shape == (2, GPU_MAX_K + 1) and (deep[1] >= 0).all()


def test_the_gpu_check_script_dry_runs_on_the_cpu(tmp_path, monkeypatch):
    # benchmarks/gpu_paths.py runs on lent GPUs only; its FAISS section must still run as written (here with
    # stand-ins: FAISS's "GPU copy" a clone of the CPU index, torch's device its CPU), and check the premise of
    # both GPU stores against an independent float64 scan.
    import json

    import torch

    import index.gpu_scan
    from benchmarks import gpu_paths

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, device, index: faiss.clone_index(index), raising=False)
    monkeypatch.setattr(index.gpu_scan, "scan_device", lambda: torch.device("cpu"))
    assert gpu_paths.main(["--device", "cpu", "--sections", "faiss", "--sizes", "5000", "--queries", "5",
                           "--out", str(tmp_path / "dry")]) == 0
    row = json.loads((tmp_path / "dry.json").read_text())["faiss_gpu"]["sizes"][0]
    assert row["gpu_on_gpu"] and row["torch_on_gpu"]
    for name in ("gpu", "torch"):
        assert row["premise"][name]["holds"] and row["premise"][name]["max_unlisted_excess"] <= 0
        assert row["certified_top10"]["same_ids_as_cpu"][name] == 5
        assert row["batch1000_same_ids_as_cpu"][name] == 1000
        assert row["k3000_max_score_diff_vs_cpu"][name] < 1e-6
    assert set(row["certified_top10"]) >= {"gpu", "torch", "cpu"}
    for reload in (row["reload"], row["ivf"]["reload"]):
        assert reload["on_gpu"] and reload["reused"] == reload["rows_before"] == 5000 and reload["rows_after"] == 5050
        assert reload["same_ids_as_cpu"] == reload["queries"] == 5
        assert len(reload["copy_s"]["full"]) == len(reload["copy_s"]["shared"]) == 3
    assert row["ivf"]["same_ids"] == 1000 and row["ivf"]["torch_on_gpu"]
    assert row["ivf"]["certified_top10"]["same_ids"] == 5
