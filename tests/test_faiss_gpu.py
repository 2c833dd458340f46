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

from encoder.certify import float32_dot_error
from index.store import GPU_MAX_K, VectorStore, gpu_arithmetic_ratio

DIM = 33


def _unit(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _tf32(x):
    """Round float32 to TF32's 10-bit mantissa (round to nearest even on the 13 dropped bits)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    b = (b + 0x0FFF + ((b >> 13) & 1)) & np.uint32(0xFFFFE000)
    return b.view(np.float32)


class StandInGpuIndex:
    """What `index_cpu_to_gpu` returns, on a machine without a GPU (module doc)."""

    def __init__(self, store: VectorStore, tf32: bool = False):
        ids = store.ids()
        vectors = store.reconstruct(ids)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(store.dim))
        self.index.add_with_ids(_tf32(vectors) if tf32 else vectors, ids)
        self.tf32, self.calls = tf32, 0

    def search(self, q, k):
        self.calls += 1
        if k > GPU_MAX_K:
            raise RuntimeError("Error: 'k > 0 && k <= getMaxKSelection(use_cuvs)' failed: GPU index only supports "
                               "min/max-K selection k <= 2048")
        return self.index.search(_tf32(q) if self.tf32 else q, k)


@pytest.fixture
def stand_in_gpu(monkeypatch):
    made = []

    def to_gpu(res, device, index, tf32=False):
        made.append(StandInGpuIndex(to_gpu.store, tf32=to_gpu.tf32))
        return made[-1]

    to_gpu.tf32 = False
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object())
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu)
    to_gpu.made = made
    return to_gpu


def test_the_arithmetic_ratio_is_the_largest_error_over_the_float32_bound():
    store = VectorStore.from_vectors(np.arange(500), _unit(500), "Flat", use_gpu=False)
    exact = gpu_arithmetic_ratio(store.index, store)
    assert 0 <= exact <= 1
    rounded = StandInGpuIndex(store, tf32=True)
    ratio = gpu_arithmetic_ratio(rounded, store)
    # independently: the same probes (every ⌊i·499/31⌋-th stored vector, perturbed, renormalised), TF32 scores
    ids = store.ids()
    pick = ids[np.linspace(0, len(ids) - 1, 32).astype(np.int64)]
    q = store.reconstruct(pick).astype(np.float64)
    q += 0.01 * np.cos(np.arange(q.size, dtype=np.float64)).reshape(q.shape)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    scores, found = rounded.search(q, 8)
    worst = 0.0
    for r in range(32):
        e = store.reconstruct(found[r]).astype(np.float64)
        bound = np.array([float32_dot_error(DIM, np.linalg.norm(v), np.linalg.norm(q[r])) for v in e])
        worst = max(worst, float(np.max(np.abs(scores[r] - e @ q[r].astype(np.float64)) / bound)))
    assert ratio == pytest.approx(worst, rel=1e-12)
    assert ratio > 10  # TF32 is ~2^-11 relative: far outside γ_D ≈ 34·2^-24


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


gpu = pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")


@gpu
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_a_gpu_copy_scores_within_the_float32_bound_and_answers_deep_searches(factory):
    v = _unit(4000)
    store = VectorStore.from_vectors(np.arange(4000), v, factory, use_gpu=True)
    assert store.on_gpu
    assert gpu_arithmetic_ratio(store._gpu_index, store) <= 1
    cpu = VectorStore(store.index, store.factory, store.params, use_gpu=False)
    q = _unit(20, seed=3)
    a, b = store.search(q, 10), cpu.search(q, 10)
    assert np.abs(a[0] - b[0]).max() < 2 * float32_dot_error(DIM, 1.0 + 1e-6)
    deep = store.search(q[:2], GPU_MAX_K + 1, exact=True)
    assert deep[1].shape == (2, GPU_MAX_K + 1) and (deep[1] >= 0).all()


def test_the_gpu_check_script_dry_runs_on_the_cpu(tmp_path):
    # benchmarks/gpu_paths.py runs on lent GPUs only; its FAISS section must still run as written (here with
    # use_gpu stores that stay on the CPU), and check the premise against an independent float64 scan.
    import json

    from benchmarks import gpu_paths

    assert gpu_paths.main(["--device", "cpu", "--sections", "faiss", "--sizes", "5000", "--queries", "5",
                           "--out", str(tmp_path / "dry")]) == 0
    row = json.loads((tmp_path / "dry.json").read_text())["faiss_gpu"]["sizes"][0]
    assert row["premise"]["holds"] and row["premise"]["max_unlisted_excess"] <= 0
    assert row["certified_top10"]["same_ids"] == 5 and row["batch1000_same_ids"] == 1000
    assert row["ivf"]["same_ids"] == 1000 and row["store_k3000_max_score_diff"] < 1e-6
