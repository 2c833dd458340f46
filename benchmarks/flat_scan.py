"""One query against a flat gallery: FAISS's own search (default threads; one thread) vs the store's scan (its
rows split over the cores, as shipped; and on the calling thread alone, as before that split).

`VectorStore.search` on a flat index answers fewer than FLAT_SCAN_MAX_QUERIES queries itself
(`VectorStore._flat_scan`): FAISS's inner-product kernel over the stored rows on the calling thread,
then the exact selection `index.store.top_rows`. FAISS's `search` runs one query in an OpenMP region
over every core; "FAISS, 1 thread" is the same search with OpenMP limited to one thread (a process-wide
setting the store cannot use per call). Certified search asks the store for the exhaustive top-m,
m = max(2k, k + 64), one query at a time, so this is its candidate scan.

One run times the three on the same store and the same queries, rotating their order query by query
(the machine's noise falls on all three), and checks that FAISS and the store return the same ids (up
to equal scores) and scores within the float32 error bound. Vectors: random unit vectors of D = 129
(lipsim:demo's width); a flat scan's cost does not depend on where the vectors lie.

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
from benchmarks.index_speed import DIM, _pct, _unit

ROOT = Path(__file__).resolve().parent.parent


def _faiss_one_thread(store, q, m):
    """FAISS's search with OpenMP limited to one thread (its default uses every core)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return store.index.search(q, m)
    finally:
        faiss.omp_set_num_threads(threads)


def _store_one_thread(store, q, m):
    """The store's scan on the calling thread alone (as it was before the scan split its rows over threads)."""
    import index.ivf as ivf

    threads = ivf._threads
    ivf._threads = lambda: 1
    try:
        return store.search(q, m)
    finally:
        ivf._threads = threads


def measure(n: int, queries: int, m: int, seed: int = 0) -> dict:
    from encoder.certify import float32_dot_error
    from index.store import VectorStore

    rng = np.random.default_rng(seed)
    store = VectorStore.from_vectors(np.arange(n, dtype=np.int64), _unit(rng, n, DIM), "Flat", use_gpu=False)
    q = _unit(rng, queries, DIM)
    runs = (("faiss", store.index.search), ("faiss-1-thread", lambda x, k: _faiss_one_thread(store, x, k)),
            ("store", store.search), ("store-1-thread", lambda x, k: _store_one_thread(store, x, k)))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    agree, worst, split_same = 0, 0.0, 0
    for i in range(queries):
        got = {}
        for name, fn in runs[i % len(runs):] + runs[:i % len(runs)]:  # the order rotates query by query
            t = time.perf_counter()
            got[name] = fn(q[i:i + 1], m)
            times[name].append(time.perf_counter() - t)
        (fs, fi), (bs, bi) = got["faiss"], got["store"]
        split_same += bool(np.array_equal(got["store-1-thread"][1], bi) and np.array_equal(got["store-1-thread"][0], bs))
        worst = max(worst, float(np.abs(fs - bs).max()))
        # same ids except where the m-th score ties
        agree += bool(set(fi[0][fs[0] > fs[0, -1]]) <= set(bi[0]))
    store.index.reset()
    out = {"n": n, "dim": DIM, "m": m, "queries": queries, **{name: _pct(t) for name, t in times.items()},
           "same_ids": agree, "split_same_answer": split_same, "max_score_difference": worst, "float32_error_bound": 2 * float32_dot_error(DIM)}
    for name in ("faiss", "faiss-1-thread", "store-1-thread"):
        out[f"{name}/store"] = float(np.median([a / b for a, b in zip(times[name], times["store"])]))
    return out


def table(report: dict) -> str:
    lines = [f"| vectors (D = {DIM}, top-{report['m']}) | FAISS search p50 / p95 | FAISS, 1 thread | "
             "store scan | store scan, 1 thread | FAISS / store | FAISS 1 thread / store | store 1 thread / store | "
             "same ids | max |Δscore| (bound) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = ("faiss", "faiss-1-thread", "store", "store-1-thread")
    for r in report["sizes"]:
        cells = [f"{r[name]['p50_ms']:.1f} / {r[name]['p95_ms']:.1f} ms" for name in names]
        lines.append(f"| {r['n']:,} | " + " | ".join(cells) + f" | {r['faiss/store']:.2f}× | "
                     f"{r['faiss-1-thread/store']:.2f}× | {r['store-1-thread/store']:.2f}× | {r['same_ids']}/{r['queries']} | "
                     f"{r['max_score_difference']:.1e} ({r['float32_error_bound']:.1e}) |")
    return ("\n".join(lines) + "\n\nOne query at a time; ratios are medians of per-query ratios. "
            f"Machine: {report['machine']}.\n")


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
