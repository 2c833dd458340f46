"""Peak memory of decoding very large images: a query of one 64-megapixel PNG, and a build over several.

Each measurement runs in its own process (`robret query` / `robret index build`), and its peak resident
set size is read from the kernel (getrusage of the finished child). For reference the same is measured
for processes that only import torch (and FAISS), and one that also loads the encoder: most of a robret
process's memory is torch itself (its shared libraries), not the image.

The images are compressible PNGs (a few hundred KB on disk, 8000×8000 RGB = 192 MB decoded): the
files a decompression-bomb-conscious decoder must still handle within its pixel limit.

    python -m benchmarks.decode_memory [--quick] [--out benchmarks/results/decode_memory]

--quick uses 2000×2000 images and 2 files (seconds); the full run 8000×8000 (64 MP) and 4 files
decoded by 4 workers. Peak RSS is reported in MiB (ru_maxrss KiB / 1024).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ENCODER = "lipsim:demo"


def make_png(path: Path, side: int, seed: int) -> None:
    """A compressible side×side RGB PNG (stripes), different per seed."""
    a = np.zeros((side, side, 3), np.uint8)
    a[seed % 7::7] = 200
    a[:, (seed % 13)::13, 1] = 90
    Image.fromarray(a).save(path)


def measure(cmd: list[str]) -> dict:
    helper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
              "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
              "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t, "
              "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
              "'stderr': p.stderr.decode()[-400:]}))")
    out = subprocess.run([sys.executable, "-c", helper, *cmd], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2000×2000 images, 2 files (seconds)")
    p.add_argument("--out", default="benchmarks/results/decode_memory", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    side, files, workers = (2000, 2, 2) if args.quick else (8000, 4, 4)
    robret = [sys.executable, "-m", "retrieval.cli"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "big"
        folder.mkdir()
        for i in range(files):
            make_png(folder / f"big{i}.png", side, i)
        # The floor under every command: the libraries alone (each exits as the CLI does, without teardown)
        rows["python -c 'import torch'"] = measure([sys.executable, "-c", "import os, torch; os._exit(0)"])
        rows["python -c 'import torch, faiss'"] = measure(
            [sys.executable, "-c", "import os, torch, faiss; os._exit(0)"])
        rows[f"baseline: robret encoder info {ENCODER} (import torch, load the encoder)"] = measure(
            [*robret, "encoder", "info", ENCODER])
        rows[f"index build, {files} × {side}×{side} PNG, {workers} workers"] = measure(
            [*robret, "index", "build", str(folder), "--index-dir", str(tmp / "idx"), "--encoder", ENCODER,
             "--workers", str(workers)])
        rows[f"query, one {side}×{side} PNG"] = measure(
            [*robret, "query", str(folder / "big0.png"), "--index-dir", str(tmp / "idx"), "-k", "1"])
        # Bulk: one batch of several large files is reduced before the model loads, as one file is; with
        # --batch-size 1 every later batch is decoded while torch and FAISS are loaded (one image at a time:
        # the query workers' decode budget).
        rows[f"query, {files} × {side}×{side} PNG (one batch)"] = measure(
            [*robret, "query", str(folder), "--index-dir", str(tmp / "idx"), "-k", "1"])
        rows[f"query, {files} × {side}×{side} PNG, --batch-size 1"] = measure(
            [*robret, "query", str(folder), "--index-dir", str(tmp / "idx"), "-k", "1", "--batch-size", "1"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| process | peak RSS (MB) | wall (s) | exit |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | {r['rc']} |")
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0 if all(r["rc"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
