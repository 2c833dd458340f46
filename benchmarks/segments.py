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
Writes benchmarks/results/segments.json and .md (--out PREFIX).
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

from benchmarks._output import write_report

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


def _timed_build(folder: Path, index_dir: Path, encoder, batch: int, **policy) -> list[dict]:
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
        build_index(folder, index_dir, f"pixels:{PIXELS}", encoder=encoder, options=opts)
    finally:
        ingest._Writer._checkpoint = real
    return rows


# name → IngestOptions fields (module doc)
POLICIES = {"before": {"compact_segments": 0}, "appended": {"merge_tiers": False}, "after": {}}


def run(n_batches: int, batch: int) -> dict:
    from encoder.registry import load_encoder
    from index import Gallery
    from index.ingest import COMPACT_SEGMENTS, compact_index

    encoder = load_encoder(f"pixels:{PIXELS}")
    tmp = Path(tempfile.mkdtemp(prefix="robret-segments-"))
    try:
        folder = tmp / "files"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n_batches * batch):  # distinct tiny PNGs: no vector is reused by content
            pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            pixels[0, 0, :] = np.frombuffer(i.to_bytes(3, "little"), np.uint8)
            Image.fromarray(pixels).save(folder / f"f{i:06d}.png")
        builds = {name: _timed_build(folder, tmp / name, encoder, batch, **policy) for name, policy in POLICIES.items()}
        t = time.perf_counter()
        compacted = compact_index(tmp / "after")
        compact_s = time.perf_counter() - t
        contents = []
        for name in POLICIES:
            with Gallery.open(tmp / name, use_gpu=False) as g:
                ids, vecs = g.all_vectors()
                order = np.argsort(ids)
                contents.append((ids[order], vecs[order]))
        same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(contents, contents[1:]))
        return {"dim": encoder.dim, "batch": batch, "checkpoints": n_batches, **builds,
                "compact_segments": COMPACT_SEGMENTS,
                "compact": {"seconds": compact_s, "files_before": compacted["files_before"],
                            "bytes": compacted["bytes"]},
                "same_ids_and_vectors": same,
                "total_seconds": {name: sum(r["seconds"] for r in rows) for name, rows in builds.items()},
                "total_bytes_written": {name: sum(r["bytes_written"] for r in rows) for name, rows in builds.items()},
                "most_live_files": {name: max(r["live_files"] for r in rows) for name, rows in builds.items()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(report: dict) -> str:
    mib = 2 ** 20
    lines = [f"| checkpoint (gallery after it, D = {report['dim']}, {report['batch']} vectors per batch) | before: "
             "whole index rewritten | appended segments (compaction past 32) | after: size-tiered segments |",
             "|---|---|---|---|"]
    for b, a, t in zip(report["before"], report["appended"], report["after"]):
        cells = [f"{r['seconds'] * 1e3:.1f} ms, {r['bytes_written'] / mib:.2f} MiB" for r in (b, a, t)]
        lines.append(f"| {b['vectors']:,} vectors | {cells[0]} | {cells[1]} ({a['kind']}) | {cells[2]} ({t['kind']}, "
                     f"{t['live_files']} live files) |")
    ts, tb, most = report["total_seconds"], report["total_bytes_written"], report["most_live_files"]
    lines.append("| **all checkpoints** | " + " | ".join(
        f"**{ts[n]:.2f} s, {tb[n] / mib:.1f} MiB** (at most {most[n]} live files)" for n in POLICIES) + " |")
    c = report["compact"]
    lines.append("")
    lines.append(f"`robret index compact` of the size-tiered build afterwards: {c['files_before']} files → 1 "
                 f"({c['bytes'] / mib:.1f} MiB) in {c['seconds']:.2f} s. Same ids and bit-identical vectors in all "
                 f"three galleries: {report['same_ids_and_vectors']}. Machine: {report['machine']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 checkpoints of 50 vectors")
    p.add_argument("--checkpoints", type=int, default=None, help="batches, one checkpoint each (default 20)")
    p.add_argument("--batch", type=int, default=None, help="vectors per batch (default 1000)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segments"),
                   help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    report = run(args.checkpoints or (8 if args.quick else 20), args.batch or (50 if args.quick else 1000))
    report["machine"] = f"{os.cpu_count()} CPUs, {platform.platform()}"
    report["quick"] = args.quick
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
