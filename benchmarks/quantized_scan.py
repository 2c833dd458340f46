"""Certified top-10 on a flat gallery: the exact scan of its float32 vectors against a scan of its int8 codes
(index/codes.py, retrieval/quantized_search.py), side by side, up to 10M vectors.

    python -m benchmarks.quantized_scan --quick                                   # 50,000 vectors (a test runs it)
    python -m benchmarks.quantized_scan --sizes 1000000 10000000 --queries 40

Data: `benchmarks.certified_search.gallery_chunks` (the lipsim-demo regime, D = 129), streamed into a float32
file and mapped as the one block of an `index.mapped.MappedFlat`, the store `Gallery.open` gives a flat gallery
on the CPU. Two query sets: fresh draws of the same clusters, and gallery items asked as they are (each its own
top-1). For every query, one after the other, `retrieval.search.search_embedding` (k = 10, L = 1, the demo
encoder's float error) runs on the gallery without codes (the flat path: an exact scan for the top 74, then
the certificate) and with them; both answers must agree (top-10 ids and radii to 1e-9) and every certificate
is checked to be the exhaustive one. Reported: the codes' build time and memory, p50/p95 of each path, the
median of the per-query ratios, and the codes path again back to back over the same queries (as a server that
answers only certified queries runs it: no exact scan in between to evict caches). Then a reload as `robret serve`
runs it after a checkpoint appended a segment of SEGMENT_ROWS vectors (the same generator, a fresh stream), either
all new or with CHANGED_ROWS of them re-adding older ids (their older rows tombstoned, as for changed files): the
codes of the grown store (base block + segment block) built in full, and with the older codes' base part shared
and only the segment's rows coded (`QuantizedCodes.from_store(..., reuse=, rows=)`, what
`Gallery.prepare_search(previous=)` does), three times each in alternating order (medians); both must be identical.
Then the scan of the same rows held in 32 files (a base and 31 segments of 1,000 rows: codes are one part a file)
against one file, query by query in alternating order. Last, the memory floor: one pass that only reads the codes'
bytes (a bitwise OR of their 64-bit words, split over the scan's threads as `index.codes.scan_upper` splits its
rows), timed like a query — no scan of every code can beat it. Writes benchmarks/results/quantized-scan.json and .md (--out PREFIX).
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._gallery import StoreGallery
from benchmarks._output import write_report
from benchmarks.certified_search import CLUSTER_SIZE, DIM, FLOAT_ERROR, clustered_unit_vectors, gallery_chunks
from benchmarks.index_speed import _machine

ROOT = Path(__file__).resolve().parent.parent
SEGMENT_ROWS = 16_000  # the appended segment of the reload measurement (a checkpoint's batch)
CHANGED_ROWS = 1_000  # of its rows, changed older rows (tombstone + the id re-added), in the "change" case


def run(n: int, queries: int, work: Path, seed: int = 0) -> dict:
    from index.codes import QuantizedCodes, quantize
    from index.mapped import MappedFlat
    from retrieval.search import search_embedding

    path = work / f"vectors-{n}.npy"
    t = time.perf_counter()
    rows = np.lib.format.open_memmap(path, "w+", np.float32, (n, DIM))
    for ids, chunk in gallery_chunks(n, DIM, seed)():
        rows[ids[0]:ids[-1] + 1] = chunk
    rows.flush()
    del rows
    generated = time.perf_counter() - t
    rows = np.load(path, mmap_mode="r")
    store = MappedFlat(DIM)
    store.add(np.arange(n), rows, stored=True)
    max_norm = store.max_norm()
    quantize(np.zeros((1, DIM), np.float32))  # the kernels loaded (numba's cache) before the build is timed
    t = time.perf_counter()
    codes = QuantizedCodes.from_store(store)
    build = time.perf_counter() - t
    plain = StoreGallery(store, None, max_norm, FLOAT_ERROR)
    coded = StoreGallery(store, None, max_norm, FLOAT_ERROR, codes)
    sets = {"clusters": clustered_unit_vectors(queries, DIM, max(8, n // CLUSTER_SIZE), seed, stream=7),
            "items": np.asarray(rows[np.sort(np.random.default_rng(seed).choice(n, queries, replace=False))])}
    search_embedding(coded, sets["clusters"][0], 10)  # warm: the kernel from numba's cache, the first pages
    search_embedding(plain, sets["clusters"][0], 10)
    row = {"n": n, "generate_s": generated, "codes_build_s": build, "codes_mb": codes.nbytes / 2**20,
           "vectors_mb": n * DIM * 4 / 2**20}
    for name, qs in sets.items():
        times = {"flat": [], "codes": []}
        exhaustive = {"flat": 0, "codes": 0}
        same, listed = 0, []
        for q in qs:
            found = {}
            for kind, gallery in (("flat", plain), ("codes", coded)):
                t = time.perf_counter()
                found[kind] = search_embedding(gallery, q, 10)
                times[kind].append(1000 * (time.perf_counter() - t))
                exhaustive[kind] += bool(found[kind].exhaustive)
            a, b = found["flat"], found["codes"]
            same += [h.id for h in a.hits] == [h.id for h in b.hits] and np.allclose(
                [h.radius for h in a.hits], [h.radius for h in b.hits], rtol=1e-9, atol=1e-12)
            listed.append(b.candidates)
        row[name] = {kind: {"p50_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95)),
                            "exhaustive": exhaustive[kind]} for kind, v in times.items()}
        row[name]["ratio_p50"] = float(np.median(np.asarray(times["flat"]) / np.asarray(times["codes"])))
        row[name]["same_answers"] = same
        row[name]["codes_listed_median"] = float(np.median(listed))
        alone = []  # the codes path back to back, as a server answering only certified queries runs it
        for q in qs:
            t = time.perf_counter()
            search_embedding(coded, q, 10)
            alone.append(1000 * (time.perf_counter() - t))
        row[name]["codes_alone"] = {"p50_ms": float(np.median(alone)), "p95_ms": float(np.percentile(alone, 95))}
    row["reload"] = _reload(rows, codes, n, seed)
    row["files"] = _files(rows, codes, sets["clusters"])
    row["stream"] = _stream(codes)
    del store, codes, rows, plain, coded
    path.unlink()
    return row


@functools.cache
def _fold():
    """A compiled bitwise OR of uint64 words (compiled once per process)."""
    from numba import njit

    @njit(nogil=True)
    def fold(words):  # pragma: no cover (compiled)
        acc = np.uint64(0)
        for i in range(len(words)):
            acc |= words[i]
        return acc

    return fold


def _files(rows, codes, queries, files: int = 32, small: int = 1000) -> dict:
    """The scan (`QuantizedCodes.scan`) of the codes of one file against the same rows as `files` files (a base,
    then files − 1 segments of `small` rows: the most segments a live set holds before a checkpoint compacts,
    index/ingest.py COMPACT_SEGMENTS), query by query in alternating order: p50 ms of each."""
    from index.codes import QuantizedCodes
    from index.mapped import MappedFlat

    n = len(rows)
    sizes = [n - (files - 1) * small] + [small] * (files - 1)
    store, at = MappedFlat(DIM), 0
    for size in sizes:
        store.add(np.arange(at, at + size), rows[at:at + size], stored=True)
        at += size
    split = QuantizedCodes.from_store(store)
    times = {"one": [], "many": []}
    for i, q in enumerate(queries):
        for name in (("one", "many") if i % 2 else ("many", "one")):
            t = time.perf_counter()
            (codes if name == "one" else split).scan(q)
            times[name].append(1000 * (time.perf_counter() - t))
    return {"files": len(split.parts), "one_file_p50_ms": float(np.median(times["one"])),
            "many_files_p50_ms": float(np.median(times["many"]))}


def _stream(codes, repeats: int = 40) -> dict:
    """p50 ms and GB/s of a pass that only reads the codes' bytes (module doc), and the bytes a scan reads."""
    from index.ivf import _executor, _threads

    fold = _fold()
    flat = codes.parts[0].codes.reshape(-1)  # (one part: the one block of the store `run` makes)
    words = flat[:len(flat) // 8 * 8].view(np.uint64)
    parts = max(1, _threads())
    cuts = np.linspace(0, len(words), parts + 1).astype(np.int64)
    chunks = [words[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    fold(chunks[0][:8])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        list(_executor().map(fold, chunks))
        times.append(time.perf_counter() - t)
    p50 = float(np.median(times))
    scanned = sum(p.codes.nbytes + p.scale.nbytes + p.resid.nbytes for p in codes.parts)  # what `scan_upper` reads
    return {"p50_ms": 1000 * p50, "gb_per_s": words.nbytes / p50 / 1e9, "threads": parts,
            "scan_bytes": scanned, "floor_ms": 1000 * scanned / (words.nbytes / p50)}


def _reload(rows, codes, n: int, seed: int) -> dict:
    """Codes of the store grown by one segment: built in full vs from `codes` (module doc); two segments: new
    rows only ("append"), and new rows plus CHANGED_ROWS of the older rows changed (a tombstone and the id
    re-added with another vector, as a changed file is: "change")."""
    from index.codes import QuantizedCodes
    from index.mapped import MappedFlat

    out = {}
    rng = np.random.default_rng(seed)
    for case in ("append", "change"):
        changed = np.sort(rng.choice(n, CHANGED_ROWS, replace=False)) if case == "change" else np.zeros(0, np.int64)
        added = clustered_unit_vectors(SEGMENT_ROWS, DIM, max(8, n // CLUSTER_SIZE), seed, stream=11)
        grown = MappedFlat(DIM)
        grown.add(np.arange(n), rows, stored=True)
        grown.remove(changed)
        grown.add(np.concatenate([changed, np.arange(n, n + SEGMENT_ROWS - len(changed))]), added, stored=True)
        times = {"full": [], "reuse": []}
        built = {}
        for order in (("full", "reuse"), ("reuse", "full"), ("full", "reuse")):  # medians of 3, each first once
            for kind in order:
                t = time.perf_counter()
                got = QuantizedCodes.from_store(grown, reuse=codes if kind == "reuse" else None, rows=n)
                times[kind].append(time.perf_counter() - t)
                built.setdefault(kind, got)
                del got
        full, kept = built.pop("full"), built.pop("reuse")
        held = {id(a) for p in codes.parts for a in p[:3]}  # the older version's arrays
        added = kept.ids.nbytes + sum(a.nbytes for p in kept.parts for a in p[:3] if id(a) not in held)
        same = np.array_equal(full.ids, kept.ids) and all(np.array_equal(a, b) for a, b in zip(full.live(), kept.live()))
        out[case] = {"rows_added": SEGMENT_ROWS, "rows_changed": len(changed), "full_s": float(np.median(times["full"])),
                     "reuse_s": float(np.median(times["reuse"])), "reused": kept.reused, "times_s": times,
                     "added_mb": added / 2**20, "full_mb": full.nbytes / 2**20,
                     "identical": bool(same and kept.max_norm >= full.max_norm)}
        del full, kept, grown
    return out


def table(report: dict) -> str:
    q = report["queries"]
    lines = [f"Certified top-10 on a mapped flat gallery (D = {DIM}, lipsim-demo regime), {q} queries per set, "
             "exact float32 scan vs int8 codes, alternating query by query\n",
             "| vectors | queries | exact scan p50 / p95 ms | int8 codes p50 / p95 ms | ratio (median per query) | "
             "int8 codes back to back p50 / p95 ms | exhaustive (exact, codes) | same top-10 and radii | "
             "scored exactly (median) | codes: build s, MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for name, title in (("clusters", "from the clusters"), ("items", "gallery items")):
            x = r[name]
            lines.append(f"| {r['n']:,} | {title} | {x['flat']['p50_ms']:.1f} / {x['flat']['p95_ms']:.1f} | "
                         f"{x['codes']['p50_ms']:.1f} / {x['codes']['p95_ms']:.1f} | {x['ratio_p50']:.2f}× | "
                         f"{x['codes_alone']['p50_ms']:.1f} / {x['codes_alone']['p95_ms']:.1f} | "
                         f"{x['flat']['exhaustive']}, {x['codes']['exhaustive']} of {q} | {x['same_answers']} of {q} | "
                         f"{x['codes_listed_median']:.0f} | {r['codes_build_s']:.2f} s, {r['codes_mb']:.0f} |")
    lines += ["", f"A reload after a checkpoint's segment of {SEGMENT_ROWS:,} vectors: the grown store's codes "
              "(medians of 3)\n",
              "| vectors before | segment | coded in full | older codes shared, the rest coded | ratio | rows shared | "
              "memory added, shared / in full | identical |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for case, x in r["reload"].items():
            what = "new rows" if case == "append" else f"{x['rows_changed']:,} older rows changed, the rest new"
            lines.append(f"| {r['n']:,} | {what} | {x['full_s']:.3f} s | {x['reuse_s']:.3f} s | "
                         f"{x['full_s'] / x['reuse_s']:.1f}× | {x['reused']:,} | {x['added_mb']:.0f} / {x['full_mb']:.0f} MB | "
                         f"{x['identical']} |")
    lines += ["", "The scan of the codes of one file against the same rows in 32 files (a base and 31 segments of 1,000 "
              "rows), p50\n", "| vectors | one file | 32 files |", "|---|---|---|"]
    for r in report["rows"]:
        x = r["files"]
        lines.append(f"| {r['n']:,} | {x['one_file_p50_ms']:.2f} ms | {x['many_files_p50_ms']:.2f} ms |")
    lines += ["", "The memory floor: a pass that only reads the codes (module doc)\n",
              "| vectors | read-only pass p50 | GB/s | threads | a scan's bytes | floor for them |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        x = r["stream"]
        lines.append(f"| {r['n']:,} | {x['p50_ms']:.1f} ms | {x['gb_per_s']:.1f} | {x['threads']} | "
                     f"{x['scan_bytes'] / 1e6:.0f} MB | {x['floor_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="50,000 vectors, 5 queries: seconds")
    ap.add_argument("--work-dir", default=None, help="where the vectors file goes (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantized-scan"))
    args = ap.parse_args(argv)
    sizes, queries = ([50_000], 5) if args.quick else (args.sizes, args.queries)
    with tempfile.TemporaryDirectory(prefix="robret-quantized-", dir=args.work_dir) as tmp:
        rows = [run(n, queries, Path(tmp)) for n in sizes]
    report = {"machine": _machine(), "queries": queries, "rows": rows}
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
