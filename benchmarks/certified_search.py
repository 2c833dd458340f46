"""Certified top-k latency: exhaustive scan vs certified IVF (retrieval/ivf_search.py), one query at a time.

    python -m benchmarks.certified_search --quick                 # seconds (a test runs it)
    nice -n 10 python -m benchmarks.certified_search --sizes 1000000 10000000 --nlist 4096 4096 --work-dir /tmp/cs

Data (`clustered_unit_vectors`): a mixture of von Mises–Fisher-like clusters on the unit sphere in
D = 129 dimensions (robret's lipsim:demo width): normalise(a·c₀ + μ_c + τ_c·z), z ~ N(0, I/D), with c₀ a
direction every embedding shares (LipSim's appended constant coordinate makes every cosine positive-ish),
cluster centres μ_c uniform on the sphere, clusters of ~36 points (crops per photo) chosen uniformly, and
(a, τ range) from REGIMES: "lipsim-demo" is calibrated on the bundled encoder's embeddings of the held-out
crop benchmark, "near-duplicates" has tight clusters. Queries are fresh draws from the same clusters (a new
crop of a known photo), not gallery items.

Per size: the exact (exhaustive) certified search is `retrieval.search`'s path (FAISS flat exact top-m,
m = max(2k, k + 64), float64 rescoring, `certify_ranked`); the certified IVF path is
`certified_ivf_search` over a `CertifiedIVF` memory-mapped from disk (vectors sorted by list). Both are
timed per query on the same queries, and the radii are compared with the reference certificate: the
exhaustive pair minimum over the whole gallery (exact flat search of growing depth until the tail no
longer binds). Reports p50/p95 latency, the speed-up, and how many IVF radii equal the reference
(relative 1e-9) and whether any is larger.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index.ivf import CertifiedIVF
from retrieval.search import default_candidates, search_embedding

__all__ = ["clustered_unit_vectors", "gallery_chunks", "ArrayGallery", "reference_certificate", "run", "main"]

DIM = 129
FLOAT_ERROR = 1e-6  # the demo encoder's order of float error (encoder.protocol.measure_float_error)


# Two regimes of the mixture (module doc): (common weight a, per-cluster spread τ range).
REGIMES = {
    # Calibrated on the bundled encoder: lipsim:demo on the held-out crop benchmark (retrieval/bench_data.py,
    # 262 crops, 192 edited queries) gives cosine s10 0.76, s50 0.58, median 0.26 over all pairs; this
    # mixture gives s10 0.72, s50 0.48, median 0.27 (same-cluster mean 0.70).
    "lipsim-demo": (0.77, (0.7, 0.95)),
    # Tight clusters (near-duplicate shots / crops): s10 0.91, s50 0.53, median 0.34, same-cluster mean 0.91.
    "near-duplicates": (0.77, (0.3, 0.5)),
}
CLUSTER_SIZE = 36  # points per cluster on average (crops per photo in the calibration benchmark)


def clustered_unit_vectors(n: int, dim: int = DIM, n_clusters: int | None = None, seed: int = 0,
                           stream: int = 0, regime: str = "lipsim-demo") -> np.ndarray:
    """(n, dim) float32 unit vectors: normalise(a·c₀ + μ_c + τ_c·z), z ~ N(0, I/dim), cluster c uniform
    among `n_clusters` (default n / 36); c₀ (a direction every embedding shares, as LipSim's constant
    coordinate makes it) and the centres μ_c uniform on the sphere; (a, τ range) from REGIMES.
    Cluster parameters are fixed by `seed`, points by `stream` (another stream: fresh points, same clusters)."""
    common, (lo, hi) = REGIMES[regime]
    n_clusters = n_clusters or max(8, n // CLUSTER_SIZE)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    c0 = rng.standard_normal(dim)
    c0 /= np.linalg.norm(c0)
    spread = rng.uniform(lo, hi, n_clusters)
    rng = np.random.default_rng([seed, stream + 1])
    which = rng.integers(0, n_clusters, n)
    x = common * c0 + centres[which] + spread[which, None] * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def gallery_chunks(n: int, dim: int = DIM, seed: int = 0, chunk: int = 250_000, regime: str = "lipsim-demo"):
    """A re-iterable source of the benchmark gallery in chunks: calling the result yields (ids, vectors)
    with ids 0..n−1 in order, the same data every time (what `CertifiedIVF.write_streamed` needs)."""
    n_clusters = max(8, n // CLUSTER_SIZE)

    def chunks():
        for s, start in enumerate(range(0, n, chunk)):
            m = min(chunk, n - start)
            yield np.arange(start, start + m, dtype=np.int64), clustered_unit_vectors(m, dim, n_clusters, seed, 100 + s, regime)

    return chunks


class ArrayGallery:
    """The surface `retrieval.search.search_embedding` needs, over vectors held outside a catalog: an exact
    FAISS flat index (ids = row numbers), or a memory-mapped `CertifiedIVF`. Paths are None."""

    def __init__(self, flat=None, ivf=None, lipschitz: float = 1.0, float_error: float = FLOAT_ERROR,
                 max_norm: float = 1.0):
        self.flat, self.certified_ivf, self.lipschitz, self.float_error = flat, ivf, lipschitz, float_error
        self.max_norm = ivf.max_norm if ivf is not None else max_norm
        self.encoder_info = {"input_size": None}
        self._n = len(ivf) if ivf is not None else flat.ntotal

    def __len__(self) -> int:
        return self._n

    def search(self, q, k: int, exact: bool = True):
        return self.flat.search(np.ascontiguousarray(q, dtype=np.float32), int(k))

    def vectors(self, ids) -> np.ndarray:
        return self.flat.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def paths(self, ids):
        return [None] * len(ids)


def reference_certificate(gallery: ArrayGallery, q: np.ndarray, k: int):
    """The exhaustive certificate itself: min over *every* outsider of r(i, j) — the exact flat list is
    lengthened until the bound on what it leaves out no longer binds (`SearchResult.exhaustive`)."""
    m = default_candidates(k)
    while True:
        res = search_embedding(gallery, q, k, candidates=m)
        if res.exhaustive or m >= len(gallery):
            return res
        m *= 4


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def nlist_for(n: int) -> int:
    """Lists for n vectors: the 'auto' index type's rule, 2^round(log2(4·√n)) (index/store.py)."""
    return int(2 ** round(np.log2(4 * np.sqrt(n))))


def run(n: int, queries: int = 100, k: int = 10, nlist: int | None = None, work_dir: Path | None = None,
        seed: int = 0, exhaustive: bool = True, regime: str = "lipsim-demo") -> dict:
    """Build (or reuse) one size's memory-mapped certified IVF and flat index, then time both paths."""
    nlist = nlist or nlist_for(n)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="certified-search-"))
    path = work_dir / f"ivf-{regime}-{n}-{nlist}-{seed}"
    chunks = gallery_chunks(n, seed=seed, regime=regime)
    t0 = time.perf_counter()
    if not (path / "manifest.json").is_file():
        first = next(chunks())[1]
        centroids = CertifiedIVF.train(first, nlist, seed)
        del first
        CertifiedIVF.write_streamed(path, centroids, chunks)
    build_s = time.perf_counter() - t0
    ivf = CertifiedIVF.open(path, verify=False)
    flat = None
    if exhaustive:
        flat = faiss.IndexFlatIP(DIM)
        for _, x in chunks():
            flat.add(x)
    g_ivf = ArrayGallery(ivf=ivf)
    g_flat = ArrayGallery(flat=flat, max_norm=ivf.max_norm) if flat is not None else None
    qs = clustered_unit_vectors(queries, DIM, max(8, n // CLUSTER_SIZE), seed, stream=7, regime=regime)
    t_ivf, t_ex, equal, larger, visited, scanned, exact_flag = [], [], 0, 0, [], [], 0
    worst = 0.0
    for q in qs:
        t = time.perf_counter()
        r_ivf = search_embedding(g_ivf, q, k)
        t_ivf.append((time.perf_counter() - t) * 1e3)
        visited.append(r_ivf.lists_visited)
        scanned.append(r_ivf.vectors_scanned)
        exact_flag += bool(r_ivf.exhaustive)
        if g_flat is None:
            continue
        t = time.perf_counter()
        search_embedding(g_flat, q, k)
        t_ex.append((time.perf_counter() - t) * 1e3)
        ref = reference_certificate(g_flat, q, k)
        a = np.array([h.radius for h in r_ivf.hits])
        b = np.array([h.radius for h in ref.hits])
        same_ids = [h.id for h in r_ivf.hits] == [h.id for h in ref.hits]
        if same_ids and np.allclose(a, b, rtol=1e-9, atol=1e-12):
            equal += 1
        if np.any(a > b * (1 + 1e-9) + 1e-12) or r_ivf.set_radius > ref.set_radius * (1 + 1e-9) + 1e-12:
            larger += 1
        worst = max(worst, float(np.max(a - b)))
    out = {"regime": regime, "n": n, "dim": DIM, "nlist": nlist, "k": k, "queries": queries, "build_or_open_s": round(build_s, 1),
           "ivf": _percentiles(t_ivf), "ivf_lists_visited_mean": round(float(np.mean(visited)), 1),
           "ivf_vectors_scanned_mean": round(float(np.mean(scanned)), 1),
           "ivf_proved_exhaustive": exact_flag}
    if t_ex:
        out.update({"exhaustive": _percentiles(t_ex),
                    "speedup_p50": round(float(np.percentile(t_ex, 50) / np.percentile(t_ivf, 50)), 1),
                    "radius_equal": equal, "radius_larger": larger, "max_radius_excess": worst})
    return out


def _markdown(rows: list[dict]) -> str:
    lines = ["| data | N | lists | exhaustive p50 / p95 (ms) | certified IVF p50 / p95 (ms) | speed-up p50 | lists visited | "
             "vectors scored | radius = exhaustive | larger |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ex = r.get("exhaustive")
        ex_s = f"{ex['p50_ms']} / {ex['p95_ms']}" if ex else "–"
        lines.append(f"| {r['regime']} | {r['n']:,} | {r['nlist']} | {ex_s} | {r['ivf']['p50_ms']} / {r['ivf']['p95_ms']} | "
                     f"{r.get('speedup_p50', '–')}× | {r['ivf_lists_visited_mean']} | {r['ivf_vectors_scanned_mean']:,.0f} | "
                     f"{r.get('radius_equal', '–')}/{r['queries']} | {r.get('radius_larger', '–')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 vectors, 10 queries per regime: seconds")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--nlist", type=int, nargs="+", default=None, help="lists per size (default: 2^round(log2(4√N)))")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--regime", choices=sorted(REGIMES), nargs="+", default=["lipsim-demo", "near-duplicates"])
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the memory-mapped galleries are written (reused)")
    ap.add_argument("--no-exhaustive", action="store_true", help="time certified IVF only (no flat index in memory)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)
    sizes, queries = ([5_000], 10) if args.quick else (args.sizes, args.queries)
    nlists = args.nlist or [None] * len(sizes)
    if len(nlists) != len(sizes):
        ap.error("give one --nlist per size")
    rows = []
    for regime in args.regime:
        for n, nl in zip(sizes, nlists):
            rows.append(run(n, queries, args.k, nl, args.work_dir, exhaustive=not args.no_exhaustive, regime=regime))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(_markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
