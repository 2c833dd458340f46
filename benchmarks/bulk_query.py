"""Certified top-10 queries from a folder: one `robret query FOLDER` process vs one process per query.

Side by side in one run, on one gallery (the bundled photos indexed with lipsim:demo) and one query
folder (the same photos, copied `--copies` times under other names, so every query decodes its file):

    bulk process      `robret query QUERIES/ --index-dir IDX -k 10 --jsonl --cpu`: queries / wall time of the
                      whole process (start-up, model and index load included)
    bulk, in process  `retrieval.bulk.run_queries` on an opened gallery with its encoder loaded: the rate
                      once started (what a long folder approaches)
    one per query     `robret query FILE --index-dir IDX -k 10 --json --cpu`, one process each, for the first
                      `--singles` files: 1 / mean wall time

Every query is certified (exhaustive list, set and order radii).

    python -m benchmarks.bulk_query [--quick] [--copies N] [--singles N] [--out benchmarks/results/bulk_query]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._output import write_report

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "lipsim:demo"


def robret(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "retrieval.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 photos, 1 copy, 1 single-query process")
    p.add_argument("--copies", type=int, default=None, help="copies of the photos in the query folder (default 3)")
    p.add_argument("--singles", type=int, default=None, help="single-query processes (default 5)")
    p.add_argument("--out", default="benchmarks/results/bulk_query", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    copies = args.copies or (1 if args.quick else 3)
    singles = args.singles or (1 if args.quick else 5)
    from encoder.samples import export_sample_photos
    from index import Gallery
    from retrieval.bulk import expand_sources, run_queries

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        export_sample_photos(photos)
        if args.quick:
            for extra in sorted(photos.iterdir())[4:]:
                extra.unlink()
        queries = tmp / "queries"
        queries.mkdir()
        for c in range(copies):
            for f in sorted(photos.iterdir()):
                shutil.copy(f, queries / f"{c}-{f.name}")
        n = len(list(queries.iterdir()))
        robret("index", "build", str(photos), "--index-dir", str(tmp / "index"), "--encoder", ENCODER, "--cpu",
               "--no-progress")

        t = time.perf_counter()
        out = robret("query", str(queries), "--index-dir", str(tmp / "index"), "-k", "10", "--jsonl", "--cpu")
        bulk_wall = time.perf_counter() - t
        records = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(records) == n and all(r.get("set_radius") is not None for r in records)

        with Gallery.open(tmp / "index", use_gpu=False) as g:
            sources = expand_sources([str(queries)])
            list(run_queries(g, sources[:2], 10))  # load the encoder, warm up
            t = time.perf_counter()
            done = list(run_queries(g, sources, 10))
            in_process = time.perf_counter() - t
        assert all(o.ok and o.result.set_radius is not None for o in done)

        single_walls = []
        for f in sorted(queries.iterdir())[:singles]:
            t = time.perf_counter()
            robret("query", str(f), "--index-dir", str(tmp / "index"), "-k", "10", "--json", "--cpu")
            single_walls.append(time.perf_counter() - t)

    report = {
        "encoder": ENCODER, "k": 10, "queries": n, "cpus": os.cpu_count(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
        "bulk_process": {"wall_s": bulk_wall, "queries_per_s": n / bulk_wall},
        "bulk_in_process": {"wall_s": in_process, "queries_per_s": n / in_process},
        "one_process_per_query": {"processes": singles, "mean_wall_s": statistics.mean(single_walls),
                                  "queries_per_s": 1 / statistics.mean(single_walls), "walls_s": single_walls},
    }
    report["speedup_bulk_process_vs_one_per_query"] = (report["bulk_process"]["queries_per_s"]
                                                       / report["one_process_per_query"]["queries_per_s"])
    return write_report(args.out, report, markdown(report))


def markdown(r: dict) -> str:
    return "\n".join([
        f"| {r['queries']} certified top-{r['k']} queries, {r['encoder']} | wall s | queries/s |",
        "|---|---|---|",
        f"| one `robret query FOLDER` process (start-up included) | {r['bulk_process']['wall_s']:.2f} | "
        f"{r['bulk_process']['queries_per_s']:.1f} |",
        f"| the same, in process once started (`run_queries`) | {r['bulk_in_process']['wall_s']:.2f} | "
        f"{r['bulk_in_process']['queries_per_s']:.1f} |",
        f"| one `robret query FILE` process per query ({r['one_process_per_query']['processes']} runs) | "
        f"{r['one_process_per_query']['mean_wall_s']:.2f} per query | "
        f"{r['one_process_per_query']['queries_per_s']:.2f} |",
        f"\nBulk process vs one process per query: {r['speedup_bulk_process_vs_one_per_query']:.1f}× "
        f"({r['cpus']} CPUs).",
    ]) + "\n"


if __name__ == "__main__":
    main()
