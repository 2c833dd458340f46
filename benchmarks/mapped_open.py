"""Opening a gallery for queries: its files copied into a FAISS index vs mapped in place (issue 15).

    python -m benchmarks.mapped_open --quick            # 20,000 vectors (seconds; a test runs it)
    python -m benchmarks.mapped_open --sizes 1000000 3000000
    python -m benchmarks.mapped_open --kinds ivf --sizes 1000000

For each size one live set is written as a writer leaves it — a base (`VectorStore.write`) holding 70% of
the rows, then three segments (`write_segment`) of 10% each, each removing 1,000 earlier ids; or with
`--kinds ivf` one IVF base of 4·√n lists (mapped by FAISS's `IO_FLAG_MMAP`, `VectorStore.read(mapped=True)`) — and
the same files are opened by fresh processes, alternating: `load_live_store(..., mapped=False)` (the copying
reader: every row read into FAISS, as before) and `mapped=True` (`index.mapped.MappedFlat`, or the IVF
lists mapped: what `Gallery.open` now does on the CPU); `--kinds ivf-segments` is the first layout with an
IVF base (its lists mapped, the segments layered on them: `index.mapped_ivf.LayeredIVF`), searched with
exact=True (every list), because the layered reader scans the segments' rows exhaustively where the copying
one finds them only in the lists it probes, so plain top-10s may differ. Both check every file's SHA-256
first, so both read every byte once, and the files are in the page cache for every run after the first of
the round (the first run of each round is dropped from the medians; `--repeat` rounds).
Per process: open time, anonymous memory gained by opening and searching (RssAnon: what is the process's
own, against file pages the kernel shares between readers and may drop), and the p50 of 20 single top-10
queries (the same queries for both; each answer is checked equal between the two readers), then of the
same 20 again (a mapped page is faulted into the process on its first touch, once); then what certifying a
first answer adds: reconstructing its top-74 and the norm bound M (`max_norm`, once per process), beside M
computed as before (every vector reconstructed, norms in float64; the copying reader only).
Writes benchmarks/results/mapped-open.json and .md (--out PREFIX).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._output import child_json, write_report
from benchmarks.index_speed import DIM, _machine, _unit
from benchmarks.startup import extract

ROOT = Path(__file__).resolve().parent.parent
QUERIES = 20

_CHILD = r"""
import hashlib, json, sys, time
import numpy as np
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
import faiss  # imports before the baseline: only what opening adds is counted
from index.layout import IndexDir
from index.segments import load_live_store
directory, meta, how, queries = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], np.load(sys.argv[4])
exact = meta["factory"].startswith("IVF") and len(meta["segments"]) > 1  # (module doc: ivf-segments)
before = anon()
t = time.perf_counter()
store = load_live_store(IndexDir(directory), meta, use_gpu=False, mapped=how == "mapped")
open_s = time.perf_counter() - t
passes = []
for _ in range(2):  # the second pass finds the pages the first touched already in the process's page table
    times, answers = [], hashlib.sha256()
    for q in queries:
        t = time.perf_counter()
        scores, ids = store.search(q[None], 10, exact=exact)
        times.append(time.perf_counter() - t)
        answers.update(scores.tobytes() + ids.tobytes())
    passes.append(1000 * float(np.median(times)))
gained = anon() - before
# what certifying a first answer adds: the top-74's vectors, then the norm bound M (once per process)
_, ids = store.search(queries[:1], 74)
t = time.perf_counter()
store.reconstruct(ids[0])
reconstruct_ms = 1000 * (time.perf_counter() - t)
t = time.perf_counter()
store.max_norm()
norm_s = time.perf_counter() - t
norm_before_s = None
# M as computed before: every vector reconstructed, norms in float64 (12 bytes a value beside the loaded
# index: past 3M vectors of D = 129 that no longer fits this machine's 24 GB, so it is skipped)
if how == "copied" and len(store) <= 3_000_000:
    t = time.perf_counter()
    every = store.reconstruct(store.ids())
    float(np.linalg.norm(every.astype(np.float64), axis=1).max())
    norm_before_s = time.perf_counter() - t
print(json.dumps({"open_s": open_s, "anon_bytes": gained, "p50_ms": passes[0], "p50_again_ms": passes[1],
                  "reconstruct_ms": reconstruct_ms, "norm_s": norm_s, "norm_before_s": norm_before_s,
                  "answers": answers.hexdigest()}))
"""


def write_live_set(directory: Path, n: int, dim: int = DIM, seed: int = 0, ivf: bool = False) -> dict:
    """A base of 70% of n random unit rows (Flat, or with ivf=True IVF of 4·√(0.7n) lists) and three segments
    (`write_segmented`); the index metadata naming them, as the catalog records it."""
    factory = f"IVF{max(16, int(4 * int(n * 0.7) ** 0.5))},Flat" if ivf else "Flat"
    return write_segmented(directory, _unit(np.random.default_rng(seed), n, dim), factory, seed)[0]


def write_segmented(directory: Path, vectors: np.ndarray, factory: str, seed: int = 0) -> tuple[dict, np.ndarray,
                                                                                                np.ndarray]:
    """A live set as a writer leaves it between compactions: a base (`VectorStore.write`, type `factory`) of the
    first 70% of `vectors` (ids: row numbers), then three segments (`write_segment`) each adding a tenth and
    removing min(1,000, a tenth of the rows so far) earlier ids. Returns the index metadata naming them, the
    live ids, and every row as stored (the base's renormalised by the store, the segments' as given)."""
    from index.layout import BASE, ROWS
    from index.segments import write_segment
    from index.store import VectorStore
    n, dim = vectors.shape
    rng = np.random.default_rng(seed + 5)
    base = int(n * 0.7)
    store = VectorStore.from_vectors(np.arange(base), vectors[:base], factory, use_gpu=False)
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "rows": base,
              "sha256": store.write(directory / "vectors.00000001.faiss")}]
    vectors = vectors.copy()
    vectors[:base] = store.reconstruct(np.arange(base))
    del store
    start, alive = base, np.zeros(n, bool)
    alive[:base] = True
    for s in range(3):
        m = (n - base) // 3 if s < 2 else n - start
        removed = rng.choice(np.flatnonzero(alive), min(1000, start // 10), replace=False)
        alive[removed] = False
        alive[start:start + m] = True
        name = f"segment.{s + 2:08d}.rows"
        sha, _ = write_segment(directory / name, dim, removed, np.arange(start, start + m), vectors[start:start + m])
        files.append({"name": name, "kind": ROWS, "rows": m, "sha256": sha})
        start += m
    meta = {"version": 4, "dim": dim, "factory": factory, "rows": int(alive.sum()), "segments": files}
    return meta, np.flatnonzero(alive), vectors


def write_base(directory: Path, n: int, dim: int = DIM, seed: int = 0, flat: bool = False) -> dict:
    """One base of n rows: IVF with nlist = 4·√n (as `auto` picks), trained on FAISS's default sample, or
    with flat=True Flat (a Flat gallery after `compact`)."""
    from index.layout import BASE
    from index.store import VectorStore
    factory = "Flat" if flat else f"IVF{max(16, int(4 * n ** 0.5))},Flat"
    store = VectorStore.from_vectors(np.arange(n), _unit(np.random.default_rng(seed), n, dim), factory, use_gpu=False)
    files = [{"name": "vectors.00000001.faiss", "kind": BASE, "rows": n,
              "sha256": store.write(directory / "vectors.00000001.faiss")}]
    return {"version": 1, "dim": dim, "factory": factory, "rows": n, "segments": files}


WRITERS = {"flat": write_live_set, "ivf": write_base,
           "flat-base": lambda directory, n, seed=0: write_base(directory, n, seed=seed, flat=True),
           "ivf-segments": lambda directory, n, seed=0: write_live_set(directory, n, seed=seed, ivf=True)}


def run(n: int, repeat: int = 3, seed: int = 0, kind: str = "flat", before: Path | None = None) -> dict:
    """One live set of `kind` and n rows, opened by each reader in fresh processes, alternating; `before`: an
    earlier tree whose mapped reader runs beside them ("before")."""
    with tempfile.TemporaryDirectory(prefix="robret-mapped-") as tmp:
        directory = Path(tmp) / "index"
        directory.mkdir()
        t = time.perf_counter()
        meta = WRITERS[kind](directory, n, seed=seed)
        write_s = time.perf_counter() - t
        queries = directory / "queries.npy"
        np.save(queries, _unit(np.random.default_rng(seed + 1), QUERIES, DIM))
        readers = {"copied": (ROOT, "copied"), "mapped": (ROOT, "mapped")}
        if before is not None:
            readers["before"] = (before, "mapped")
        runs: dict[str, list[dict]] = {name: [] for name in readers}
        for r in range(repeat + 1):  # round 0 warms the page cache and is dropped
            for name in (list(readers) if r % 2 == 0 else list(readers)[::-1]):
                tree, how = readers[name]
                figures = child_json(_CHILD, [directory, json.dumps(meta), how, queries], tree, f"the {name} reader")
                if r:
                    runs[name].append(figures)
        digests = {run["answers"] for rows in runs.values() for run in rows}
        if len(digests) != 1:
            raise AssertionError("the readers answered differently")
        row = {"kind": meta["factory"], "n": n, "dim": DIM, "rows_live": meta["rows"], "files": len(meta["segments"]),
               "bytes": sum((directory / f["name"]).stat().st_size for f in meta["segments"]), "write_s": round(write_s, 1)}
        for how, rows in runs.items():
            row[how] = {key: float(np.median([x[key] for x in rows]))
                        for key in ("open_s", "anon_bytes", "p50_ms", "p50_again_ms", "reconstruct_ms", "norm_s")}
        before_s = [x["norm_before_s"] for x in runs["copied"] if x["norm_before_s"] is not None]
        row["norm_before_s"] = float(np.median(before_s)) if before_s else None
        return row


def _pair(row: dict, key: str, fmt: str, scale: float = 1.0, hows=("copied", "mapped")) -> str:
    """"copied / mapped" (or other readers) for one figure of a row."""
    return " / ".join(format(row[how][key] / scale, fmt) for how in hows)


def table(report: dict) -> str:
    mb = 2 ** 20
    lines = [f"Opening a gallery of D = {report['rows'][0]['dim']} (files 4: a base + 3 segments with tombstones; "
             f"files 1: one base; IVF with segments searched exactly), fresh process, median of {report['repeat']} "
             "rounds\n",
             "| index | files | vectors | file MB | open s: copied / mapped | own memory MB: copied / mapped "
             "| top-10 p50 ms, first pass: copied / mapped | same queries again |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.get('kind', 'Flat')} | {r['files']} | {r['rows_live']:,} | {r['bytes'] / mb:,.0f} | "
              f"{_pair(r, 'open_s', '.2f')} | "
              f"{_pair(r, 'anon_bytes', ',.0f', mb)} | {_pair(r, 'p50_ms', '.1f')} | {_pair(r, 'p50_again_ms', '.1f')} |"
              for r in report["rows"]]
    lines += ["", "What certifying a first answer adds in the process: the top-74's vectors, then the bound M on "
              "every norm (before: every vector reconstructed and its norm taken in float64)\n",
              "| index | vectors | reconstruct top-74 ms: copied / mapped | M s: before / copied / mapped |",
              "|---|---|---|---|"]
    lines += [f"| {r.get('kind', 'Flat')} | {r['rows_live']:,} | {_pair(r, 'reconstruct_ms', '.2f')} | "
              f"{'–' if r['norm_before_s'] is None else format(r['norm_before_s'], '.3f')} / {_pair(r, 'norm_s', '.3f')} |"
              for r in report["rows"]]
    if report.get("before"):
        lines += ["", f"The mapped reader of {report['before']} (before) and of this tree (after), side by side\n",
                  "| index | files | vectors | open s: before / after | own memory MB: before / after "
                  "| own memory bytes a vector: before / after | top-10 p50 ms: before / after |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.get('kind', 'Flat')} | {r['files']} | {r['rows_live']:,} | "
                  f"{_pair(r, 'open_s', '.2f', hows=('before', 'mapped'))} | "
                  f"{_pair(r, 'anon_bytes', ',.0f', mb, ('before', 'mapped'))} | "
                  f"{_pair(r, 'anon_bytes', '.1f', r['rows_live'], ('before', 'mapped'))} | "
                  f"{_pair(r, 'p50_ms', '.1f', hows=('before', 'mapped'))} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--kinds", nargs="+", choices=sorted(WRITERS), default=["flat"],
                    help="flat: base + segments; flat-base: one Flat base; ivf: one IVF base; ivf-segments: an "
                         "IVF base + segments (searched exactly)")
    ap.add_argument("--before", default=None, help="a git revision whose mapped reader runs beside (default: none)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds after the warm-up round (default 3)")
    ap.add_argument("--quick", action="store_true", help="20,000 vectors, 1 round: seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mapped-open"))
    args = ap.parse_args(argv)
    sizes, repeat = ([20_000], 1) if args.quick else (args.sizes, args.repeat)
    with tempfile.TemporaryDirectory(prefix="robret-mapped-before-") as tmp:
        before = extract(args.before, Path(tmp)) if args.before else None
        rows = [run(n, repeat, kind=kind, before=before) for kind in args.kinds for n in sizes]
    report = {"machine": _machine(), "repeat": repeat, "queries": QUERIES, "rows": rows, "before": args.before}
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
