"""One query against a flat gallery: FAISS's own search vs the store's BLAS scan, side by side.

`VectorStore.search` on a flat index answers fewer than BLAS_SCAN_MAX_QUERIES queries with one BLAS
product over FAISS's stored rows and a partial sort (`VectorStore._flat_scan`); FAISS's `search`
scores those rows one by one into a heap. Certified search asks the store for the exhaustive top-m,
m = max(2k, k + 64), one query at a time, so this is its candidate scan.

One run times both on the same store and the same queries, alternating query by query (the
machine's noise falls on both), and checks that they return the same ids (up to equal scores) and
scores within the float32 error bound. Vectors: random unit vectors of D = 129 (lipsim:demo's width);
a flat scan's cost does not depend on where the vectors lie.

    python -m benchmarks.flat_scan                         # 100k and 1M vectors, 200 queries
    python -m benchmarks.flat_scan --quick                 # 20k vectors, 20 queries (seconds)
Writes benchmarks/results/flat_scan.json and .md (--out PREFIX).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks._output import write_report

ROOT = Path(__file__).resolve().parent.parent
DIM = 129


def _unit(rng, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # in blocks: no float64 copy of the whole gallery
        x = rng.standard_normal((min(100_000, n - s), dim))
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def measure(n: int, queries: int, m: int, seed: int = 0) -> dict:
    from encoder.certify import float32_dot_error
    from index.store import VectorStore

    rng = np.random.default_rng(seed)
    store = VectorStore.from_vectors(np.arange(n, dtype=np.int64), _unit(rng, n, DIM), "Flat", use_gpu=False)
    q = _unit(rng, queries, DIM)
    times = {"faiss": [], "blas": []}
    agree, worst = 0, 0.0
    for i in range(queries):
        order = (("faiss", store.index.search), ("blas", store.search))
        got = {}
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            got[name] = fn(q[i:i + 1], m)
            times[name].append(time.perf_counter() - t)
        (fs, fi), (bs, bi) = got["faiss"], got["blas"]
        worst = max(worst, float(np.abs(fs - bs).max()))
        # same ids except where the m-th score ties
        agree += bool(set(fi[0][fs[0] > fs[0, -1]]) <= set(bi[0]))
    store.index.reset()
    out = {"n": n, "dim": DIM, "m": m, "queries": queries, "faiss": _percentiles(times["faiss"]),
           "blas": _percentiles(times["blas"]), "same_ids": agree, "max_score_difference": worst,
           "float32_error_bound": 2 * float32_dot_error(DIM)}
    out["speedup_p50"] = out["faiss"]["p50_ms"] / out["blas"]["p50_ms"]
    out["ratios"] = sorted(a / b for a, b in zip(times["faiss"], times["blas"]))
    out["median_pair_ratio"] = float(np.median(out["ratios"]))
    return out


def table(report: dict) -> str:
    lines = [f"| vectors (D = {DIM}, top-{report['m']}) | FAISS search p50 / p95 | BLAS scan p50 / p95 | "
             "FAISS / BLAS, median of pairs | same ids | max |Δscore| (bound) |", "|---|---|---|---|---|---|"]
    for r in report["sizes"]:
        lines.append(f"| {r['n']:,} | {r['faiss']['p50_ms']:.1f} / {r['faiss']['p95_ms']:.1f} ms | "
                     f"{r['blas']['p50_ms']:.1f} / {r['blas']['p95_ms']:.1f} ms | {r['median_pair_ratio']:.2f}× | "
                     f"{r['same_ids']}/{r['queries']} | {r['max_score_difference']:.1e} "
                     f"({r['float32_error_bound']:.1e}) |")
    return "\n".join(lines) + f"\n\nOne query at a time. Machine: {report['machine']}.\n"


def main(argv: list[str] | None = None) -> dict:
    from retrieval.search import default_candidates

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20k vectors, 20 queries")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="gallery sizes (default 100000 1000000)")
    p.add_argument("--queries", type=int, default=None, help="queries per size (default 200)")
    p.add_argument("-k", type=int, default=10, help="the certified top-k; the scan asks for m = max(2k, k + 64)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flat_scan"),
                   help="output prefix: PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    queries = args.queries or (20 if args.quick else 200)
    m = default_candidates(args.k)
    report = {"sizes": [measure(n, queries, m) for n in sizes], "k": args.k, "m": m, "quick": args.quick,
              "machine": f"{os.cpu_count()} CPUs, {platform.platform()}"}
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
