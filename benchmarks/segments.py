"""Checkpoint cost as the gallery grows: whole-file rewrite, appended segments, size-tiered segments.

One run builds the same synthetic gallery three times with the real writer (`index.build_index`, one
checkpoint per batch, `checkpoint_seconds=0`) and times every checkpoint (`_Writer._checkpoint`: new file
written, fsynced and renamed, directory fsynced, catalog committed, leftovers deleted):
- before:   `compact_segments=0`, every checkpoint writes the whole index (the layout before segments);
- appended: `merge_tiers=False`, every checkpoint appends a segment of the batch's rows (a whole index only
  at the first checkpoint, and once the live set holds COMPACT_SEGMENTS segments);
- after:    the default, size-tiered: a checkpoint's segment also takes in the newest live files while
  they are no larger than it (a base when it reaches the first file; `_Writer._merge_start`).
Then `compact_index` merges the tiered build's files into one (timed), and the three galleries are
checked to hold the same ids and bit-identical vectors.

Vectors are synthetic unit vectors of dimension D (default 1729: the `pixels:24` encoder's, close to the
1792 of LipSim small); the files are tiny distinct placeholders, hashed and "embedded" through the
writer's `embed_files` hook, so the figures are the storage path's alone (no decoding or model).

    python -m benchmarks.segments                      # 20 checkpoints of 1,000 vectors (≈ 30 s)
    python -m benchmarks.segments --checkpoints 40 --batch 2500   # 100k vectors
    python -m benchmarks.segments --quick              # 8 checkpoints of 50 vectors (seconds)
    python -m benchmarks.segments --pixels 7 --policies appended after --checkpoints 100 --batch 10000
                                                       # 1M vectors of D = 148 (LipSim demo's width is 129)
Writes benchmarks/results/segments.json, .md and .png (checkpoint time against gallery size; --out PREFIX).
Long runs list every ⌈checkpoints/20⌉-th checkpoint in the table (all are in the JSON); "first tenth" and
"last tenth" give the mean checkpoint time over the first and last 10% of checkpoints that wrote a segment of
rows, the figure that shows whether a checkpoint's cost grows with the gallery.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._output import line_plot, write_report

ROOT = Path(__file__).resolve().parent.parent
PIXELS = 24  # pixels:24 embeds into 3·24² + 1 = 1729 dimensions


def _unit(seed: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return x / np.linalg.norm(x)


def _embed_files(dim: int):
    """An `IngestOptions.embed_files` hook: each placeholder file's vector is a function of its bytes."""
    from index.decode import hash_bytes, read_bytes

    def embed(paths, identity, limits, root):
        for position, path in enumerate(paths):
            data = read_bytes(path, limits.max_bytes, root=root)
            seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
            yield position, {"vector": _unit(seed, dim), "digest": hash_bytes(data), "size": len(data),
                             "width": 1, "height": 1, "notes": []}
    return embed


def _timed_build(folder: Path, index_dir: Path, encoder, batch: int, pixels: int = PIXELS, **policy) -> list[dict]:
    """build_index with one checkpoint per batch; returns one row per checkpoint that wrote a file."""
    from index import IngestOptions, build_index
    from index import ingest

    rows: list[dict] = []
    real = ingest._Writer._checkpoint

    def timed(self, final):
        version = self.version
        t = time.perf_counter()
        real(self, final)
        seconds = time.perf_counter() - t
        if self.version != version:
            new = self.live[-1] if self.live else None
            rows.append({"vectors": self.store.ntotal, "seconds": seconds, "kind": new and new["kind"],
                         "bytes_written": new["bytes"] if new and new["version"] == self.version else 0,
                         "live_files": len(self.live)})

    opts = IngestOptions(batch_size=batch, workers=1, checkpoint_seconds=0, use_gpu=False,
                         embed_files=_embed_files(encoder.dim), **policy)
    ingest._Writer._checkpoint = timed
    try:
        build_index(folder, index_dir, f"pixels:{pixels}", encoder=encoder, options=opts)
    finally:
        ingest._Writer._checkpoint = real
    return rows


# name → IngestOptions fields (module doc)
POLICIES = {"before": {"compact_segments": 0}, "appended": {"merge_tiers": False}, "after": {}}


def run(n_batches: int, batch: int, pixels: int = PIXELS, policies=tuple(POLICIES)) -> dict:
    from encoder.registry import load_encoder
    from index import Gallery
    from index.ingest import COMPACT_SEGMENTS, compact_index

    encoder = load_encoder(f"pixels:{pixels}")
    tmp = Path(tempfile.mkdtemp(prefix="robret-segments-"))
    try:
        folder = tmp / "files"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n_batches * batch):  # distinct tiny PNGs: no vector is reused by content
            image = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            image[0, 0, :] = np.frombuffer(i.to_bytes(3, "little"), np.uint8)
            Image.fromarray(image).save(folder / f"f{i:06d}.png")
        builds = {name: _timed_build(folder, tmp / name, encoder, batch, pixels, **POLICIES[name]) for name in policies}
        t = time.perf_counter()
        compacted = compact_index(tmp / policies[-1])
        compact_s = time.perf_counter() - t
        contents = []
        for name in policies:
            with Gallery.open(tmp / name, use_gpu=False) as g:
                ids, vecs = g.all_vectors()
                order = np.argsort(ids)
                contents.append((ids[order], vecs[order]))
        same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(contents, contents[1:]))
        return {"dim": encoder.dim, "batch": batch, "checkpoints": n_batches, "policies": list(policies), **builds,
                "compacted": policies[-1],
                "compact_segments": COMPACT_SEGMENTS,
                "compact": {"seconds": compact_s, "files_before": compacted["files_before"],
                            "bytes": compacted["bytes"]},
                "same_ids_and_vectors": same,
                "total_seconds": {name: sum(r["seconds"] for r in rows) for name, rows in builds.items()},
                "total_bytes_written": {name: sum(r["bytes_written"] for r in rows) for name, rows in builds.items()},
                "most_live_files": {name: max(r["live_files"] for r in rows) for name, rows in builds.items()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HEADINGS = {"before": "before: whole index rewritten", "appended": "appended segments (compaction past 32)",
            "after": "after: size-tiered segments"}


def tenths(rows: list[dict]) -> tuple[float, float] | None:
    """Mean seconds of the first and last 10% (at least one) of the checkpoints that wrote a segment of rows."""
    seg = [r["seconds"] for r in rows if r["kind"] == "rows"]
    if not seg:
        return None
    n = max(1, len(seg) // 10)
    return float(np.mean(seg[:n])), float(np.mean(seg[-n:]))


def table(report: dict) -> str:
    mib = 2 ** 20
    names = report.get("policies", list(POLICIES))
    lines = [f"| checkpoint (gallery after it, D = {report['dim']}, {report['batch']:,} vectors per batch) | "
             + " | ".join(HEADINGS[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    step = -(-report["checkpoints"] // 20)
    builds = [report[n] for n in names]
    for i, rows in enumerate(zip(*builds)):
        if i % step and i != report["checkpoints"] - 1:
            continue
        cells = []
        for name, r in zip(names, rows):
            cell = f"{r['seconds'] * 1e3:.1f} ms, {r['bytes_written'] / mib:.2f} MiB"
            if name == "appended":
                cell += f" ({r['kind']})"
            elif name == "after":
                cell += f" ({r['kind']}, {r['live_files']} live files)"
            cells.append(cell)
        lines.append(f"| {rows[0]['vectors']:,} vectors | " + " | ".join(cells) + " |")
    ts, tb, most = report["total_seconds"], report["total_bytes_written"], report["most_live_files"]
    lines.append("| **all checkpoints** | " + " | ".join(
        f"**{ts[n]:.2f} s, {tb[n] / mib:.1f} MiB** (at most {most[n]} live files)" for n in names) + " |")
    cells = []
    for n in names:
        t = tenths(report[n])
        cells.append("–" if t is None else f"{t[0] * 1e3:.1f} ms → {t[1] * 1e3:.1f} ms")
    lines.append("| segment checkpoints, mean of the first → last tenth | " + " | ".join(cells) + " |")
    c = report["compact"]
    lines.append("")
    lines.append(f"`robret index compact` of the {report.get('compacted', 'after')} build afterwards: {c['files_before']} "
                 f"files → 1 ({c['bytes'] / mib:.1f} MiB) in {c['seconds']:.2f} s. Same ids and bit-identical vectors in "
                 f"all {len(names)} galleries: {report['same_ids_and_vectors']}. Machine: {report['machine']}.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Checkpoint seconds against gallery size, one line per policy (log scale in time)."""
    names = report.get("policies", list(POLICIES))
    line_plot(path, {HEADINGS[n]: ([r["vectors"] for r in report[n]], [r["seconds"] for r in report[n]])
                     for n in names},
              "vectors in the gallery after the checkpoint", "checkpoint time (s)",
              f"Checkpoint cost as the gallery grows (D = {report['dim']}, {report['batch']:,} per batch)", log_y=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 checkpoints of 50 vectors")
    p.add_argument("--checkpoints", type=int, default=None, help="batches, one checkpoint each (default 20)")
    p.add_argument("--batch", type=int, default=None, help="vectors per batch (default 1000)")
    p.add_argument("--pixels", type=int, default=PIXELS,
                   help=f"the pixels:P encoder whose width D = 3·P² + 1 the vectors take (default {PIXELS}: D = 1729)")
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                   help="which builds to run (default all three; the last one is compacted afterwards)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segments"),
                   help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    report = run(args.checkpoints or (8 if args.quick else 20), args.batch or (50 if args.quick else 1000),
                 args.pixels, tuple(dict.fromkeys(args.policies)))
    report["machine"] = f"{os.cpu_count()} CPUs, {platform.platform()}"
    report["quick"] = args.quick
    return write_report(args.out, report, table(report), plot)


if __name__ == "__main__":
    main()
