"""Certified top-10 on an IVF gallery as `Gallery` runs it: this tree against an earlier one, side by side,
beside a Flat gallery of the same vectors.

    python -m benchmarks.gallery_certified --quick                     # 20,000 vectors, after only (a test runs it)
    python -m benchmarks.gallery_certified --n 1000000 --before 51b9c7c

`--segments` writes the IVF gallery as a writer leaves it between compactions (a base of 70% of the rows and
three segments, each adding a tenth and removing 1,000 earlier ids: readers now layer them on the mapped
base, index/mapped_ivf.py, where they loaded everything before). A gallery of more than a million vectors is
IVF under `auto`, and `Gallery.certified_ivf` views its FAISS lists (`CertifiedIVF.from_faiss`, the lists
mapped; with segments `LayeredIVF.certified_lists`), which certified search
scans round by round (`CertifiedIVF.top_in_lists`: FAISS's own scan of a round's lists, since 77e4a69;
one kernel call a list before) — unlike `benchmarks/certified_search.py`, whose saved store is contiguous
and scanned in one product once most lists are needed. Data: `benchmarks.certified_search
.clustered_unit_vectors` (regime lipsim-demo), one IVF base of 4·√n lists as `auto` picks, and one Flat base
of the same vectors; queries from the same clusters. Each tree's child process opens each live set mapped
(`load_live_store(mapped=True)`), builds the certified lists of the IVF one, then times
`retrieval.search.search_embedding` (k = 10, L = 1, the demo encoder's float error) on both galleries
(`benchmarks._gallery.StoreGallery`) for every query, and reports p50/p95, how many certificates are
exhaustive and a digest of the answers (top-10 ids and radii to 1e-9), so the trees and the two galleries
are checked to certify the same; in a tree that has them, the Flat gallery also with its int8 codes built
(`index.codes`, certified search by `retrieval.quantized_search`; the build timed in the lists column) — for two query sets: the queries above, and as many gallery items, each
asked as it is (not excluded, so it is its own top-1 at score 1). Rounds alternate the trees (`--repeat`, medians of per-round p50s).
Writes benchmarks/results/gallery-certified.json and .md (--out PREFIX).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._output import child_json, write_report
from benchmarks.certified_search import DIM, FLOAT_ERROR, clustered_unit_vectors
from benchmarks.index_speed import _machine
from benchmarks.mapped_open import write_segmented

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import hashlib, importlib.util, json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("robret_bench_gallery", sys.argv[6])  # this tree's adapter
adapter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adapter)
from index.ivf import CertifiedIVF
from index.layout import IndexDir
from index.segments import load_live_store
from retrieval.search import search_embedding
directory, meta, sets, float_error = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), float(sys.argv[5])
out = {name: {} for name in sets}
codes = importlib.util.find_spec("index.codes") is not None  # int8 codes (a tree since they were added)
for kind in ("ivf", "flat") + (("codes",) if codes else ()):
    store = load_live_store(IndexDir(directory), meta["flat" if kind == "codes" else kind], use_gpu=False, mapped=True)
    t = time.perf_counter()
    layered = getattr(store, "certified_lists", None)  # segments layered on a mapped base (index/mapped_ivf.py)
    ivf = None if kind != "ivf" else layered() if layered is not None else CertifiedIVF.from_faiss(store.index)
    quantized = None
    if kind == "codes":
        from index.codes import QuantizedCodes
        quantized = QuantizedCodes.from_store(store)
        quantized.scan(np.zeros(store.dim, np.float32))  # (the kernel loaded: from numba's cache)
    gallery = adapter.StoreGallery(store, ivf, ivf.max_norm if ivf is not None else store.max_norm(), float_error,
                                   quantized)
    built = time.perf_counter() - t
    for name, path in sets.items():
        times, digest, visited, exhaustive = [], hashlib.sha256(), [], 0
        for q in np.load(path):
            t = time.perf_counter()
            found = search_embedding(gallery, q, 10)
            times.append(1000 * (time.perf_counter() - t))
            digest.update(np.asarray([h.id for h in found.hits], np.int64).tobytes()
                          + np.round([h.radius for h in found.hits], 9).tobytes())
            visited.append(found.lists_visited or 0)
            exhaustive += bool(found.exhaustive)
        out[name][kind] = {"p50_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
                           "lists_s": built, "lists_visited_median": float(np.median(visited)),
                           "exhaustive": exhaustive, "answers": digest.hexdigest()}
    del gallery, ivf, store
print(json.dumps(out))
"""


def run(n: int, queries: int, repeat: int, before: str | None, seed: int = 0, segments: bool = False) -> dict:
    from benchmarks.startup import extract
    from index.layout import BASE
    from index.store import VectorStore
    with tempfile.TemporaryDirectory(prefix="robret-gallery-certified-") as tmp:
        tmp = Path(tmp)
        (tmp / "index").mkdir()
        nlist = max(16, int(4 * n ** 0.5))
        vectors = clustered_unit_vectors(n, DIM, seed=seed)
        meta, live = {}, np.arange(n)
        if segments:  # the IVF gallery as a base of 70% and three segments; the Flat one its live rows, bit for bit
            meta["ivf"], live, vectors = write_segmented(tmp / "index", vectors, f"IVF{nlist},Flat", seed)
        for kind, factory, name in (("ivf", f"IVF{nlist},Flat", "vectors.00000001.faiss"),
                                    ("flat", "Flat", "vectors.00000002.faiss")):
            if kind in meta:
                continue
            if segments:  # the rows as the live set stores them (from_vectors would renormalise them again)
                store = VectorStore.create(DIM, factory, use_gpu=False)
                store.add(live, vectors[live], stored=True)
            else:
                store = VectorStore.from_vectors(live, vectors[live], factory, use_gpu=False)
            files = [{"name": name, "kind": BASE, "rows": len(live), "sha256": store.write(tmp / "index" / name)}]
            meta[kind] = {"version": 1, "dim": DIM, "factory": factory, "rows": len(live), "segments": files}
            del store
        sets = {"clusters": tmp / "queries.npy", "items": tmp / "items.npy"}
        np.save(sets["clusters"], clustered_unit_vectors(queries, DIM, max(8, n // 36), seed, stream=7))
        np.save(sets["items"], vectors[np.random.default_rng(seed).choice(live, queries, replace=False)])
        del vectors
        trees = {"after": ROOT}
        if before:
            (tmp / "before").mkdir()
            trees = {"before": extract(before, tmp / "before"), "after": ROOT}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(repeat):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                results[name].append(child_json(_CHILD, [trees[name], tmp / "index", json.dumps(meta),
                                                        json.dumps({k: str(v) for k, v in sets.items()}), FLOAT_ERROR,
                                                        ROOT / "benchmarks" / "_gallery.py"],
                                                tmp, f"the {name} tree"))
        row = {"n": n, "nlist": nlist, "queries": queries, "segments": segments, "live": len(live),
               **_summary({name: [x["clusters"] for x in rows] for name, rows in results.items()})}
        row["gallery_items"] = _summary({name: [x["items"] for x in rows] for name, rows in results.items()})
        return row


def _summary(results: dict[str, list[dict]]) -> dict:
    """Medians over rounds of one query set's figures per tree and gallery kind, and the answers' agreement."""
    digests = {x["ivf"]["answers"] for rows in results.values() for x in rows}
    row = {"same_answers": len(digests) == 1,  # every tree and round, IVF
           "flat_same_answers": {x["flat"]["answers"] for x in results["after"]} == {x["ivf"]["answers"] for x in
                                                                                     results["after"]}}  # this tree
    if "codes" in results["after"][0]:
        row["codes_same_answers"] = {x["codes"]["answers"] for x in results["after"]} == {
            x["flat"]["answers"] for x in results["after"]}
        row["flat_over_codes_p50"] = float(np.median([a["flat"]["p50_ms"] / a["codes"]["p50_ms"]
                                                      for a in results["after"]]))
    for name, rows in results.items():
        for kind in [k for k in ("ivf", "flat", "codes") if k in rows[0]]:
            row[name if kind == "ivf" else f"{name}_{kind}"] = {
                key: float(np.median([x[kind][key] for x in rows]))
                for key in ("p50_ms", "p95_ms", "lists_s", "lists_visited_median", "exhaustive")}
    if "before" in results:
        row["speedup_p50"] = float(np.median([b["ivf"]["p50_ms"] / a["ivf"]["p50_ms"]
                                              for b, a in zip(results["before"], results["after"])]))
    row["ivf_over_flat_p50"] = float(np.median([a["ivf"]["p50_ms"] / a["flat"]["p50_ms"] for a in results["after"]]))
    return row


def table(report: dict) -> str:
    top = report["row"]
    layout = (f", as a base of 70% + 3 segments with tombstones ({top['live']:,} live; the Flat gallery holds the "
              "same live rows)") if top.get("segments") else ""
    lines = [f"Certified top-10 on an IVF gallery ({top['n']:,} vectors, IVF{top['nlist']}, D = {DIM}, lipsim-demo "
             f"regime{layout}), {top['queries']} queries per set, median of {report['repeat']} rounds"
             + (f"; before = {report['before']}" if report["before"] else "") + "\n"]
    for title, r in (("Queries from the gallery's clusters", top),
                     ("Gallery items as queries (not excluded: each is its own top-1)", top.get("gallery_items"))):
        if r is not None:
            lines += [f"{title}:\n"] + _set_table(r, top["queries"]) + [""]
    return "\n".join(lines) + "\n"


def _set_table(r: dict, queries: int) -> list[str]:
    trees = [t for t in ("before", "after") if t in r]
    lines = ["| tree: gallery | p50 ms | p95 ms | certified lists built s | lists visited (median) | exhaustive |",
             "|---|---|---|---|---|---|"]
    for t in trees:
        x = r[t]
        lines.append(f"| {t}: IVF | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | {x['lists_s']:.2f} | "
                     f"{x['lists_visited_median']:.0f} | {x['exhaustive']:.0f} of {queries} |")
    for t in trees:
        x = r[f"{t}_flat"]
        lines.append(f"| {t}: the same vectors as Flat | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | – | – | "
                     f"{x['exhaustive']:.0f} of {queries} |")
    for t in [t for t in trees if f"{t}_codes" in r]:
        x = r[f"{t}_codes"]
        lines.append(f"| {t}: Flat with int8 codes (codes built s in the lists column) | {x['p50_ms']:.1f} | "
                     f"{x['p95_ms']:.1f} | {x['lists_s']:.2f} | – | {x['exhaustive']:.0f} of {queries} |")
    if "speedup_p50" in r:
        lines.append(f"\nIVF before / after p50 (median of per-round ratios): {r['speedup_p50']:.2f}×; "
                     f"same top-10 and radii: {'yes' if r['same_answers'] else 'no'}")
    lines.append(f"\nIVF / Flat p50 in this tree (median of per-round ratios): {r['ivf_over_flat_p50']:.2f}×; "
                 f"Flat gave the same top-10 and radii: {'yes' if r['flat_same_answers'] else 'no'} "
                 "(exhaustive certificates per round: medians)")
    if "flat_over_codes_p50" in r:
        lines.append(f"\nFlat / Flat with int8 codes p50 in this tree: {r['flat_over_codes_p50']:.2f}×; the same top-10 "
                     f"and radii: {'yes' if r['codes_same_answers'] else 'no'}")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", default=None, help="a git revision to time beside this tree (default: none)")
    ap.add_argument("--quick", action="store_true", help="20,000 vectors, 5 queries, one round: seconds")
    ap.add_argument("--segments", action="store_true",
                    help="the IVF gallery as a base of 70%% and three segments (adds and tombstones), not one base")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gallery-certified"))
    args = ap.parse_args(argv)
    n, queries, repeat = (20_000, 5, 1) if args.quick else (args.n, args.queries, args.repeat)
    report = {"machine": _machine(), "repeat": repeat, "before": args.before,
              "row": run(n, queries, repeat, args.before, segments=args.segments)}
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
