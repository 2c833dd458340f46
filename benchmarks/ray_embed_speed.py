"""Index build speed: local vs Ray Data with 1 and 2 CPU actors, and the per-actor start-up overhead.

Builds the same folder of distinct JPEGs (crops of the bundled sample photos) into fresh index
directories: once locally (`build_index`, decode threads + the encoder in this process), then with
`IngestOptions(embed_files=RayEmbedder(actors=n))` on a local Ray cluster (`ray.init(num_cpus=2)`).
images/s = embedded files / wall seconds of the whole build (scan, hash, decode, embed, write). The
per-actor overhead is the wall time of a Ray build of a single image (actor start: worker process,
imports, encoder load and weight check; plus Ray Data's pipeline set-up) minus the local build of it,
measured on a second such run (the first also pays Ray Data's one-time set-up in this process).
"writer only" replaces the embedding by a free one: the images/s one writer can absorb at most.

    python -m benchmarks.ray_embed_speed [--images 240] [--encoder lipsim:demo] [--quick]
                                         [--out benchmarks/results/ray_embed_speed]

--quick: 24 images, the tiny random encoder (seconds).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(folder: Path, n: int) -> None:
    """n distinct 256×256 JPEGs: crops of the sample photos at shifting offsets."""
    from encoder.samples import export_sample_photos

    src = folder.parent / f"samples-{folder.name}"
    export_sample_photos(src)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(src.iterdir())]
    photos = [p for p in photos if min(p.shape[:2]) >= 300]
    folder.mkdir(parents=True)
    for i in range(n):
        a = photos[i % len(photos)]
        dy, dx = (7 * i) % (a.shape[0] - 256), (13 * i) % (a.shape[1] - 256)
        crop = a[dy:dy + 256, dx:dx + 256].copy()
        crop[:8, :8] = (i % 256, i // 256 % 256, 0)  # content (hence hash) distinct even where crops repeat
        Image.fromarray(crop).save(folder / f"img{i:05d}.jpg", quality=90)


def timed_build(folder: Path, index_dir: Path, spec: str, encoder, embed_files=None) -> dict:
    from index import IngestOptions, build_index

    t = time.perf_counter()
    report = build_index(folder, index_dir, spec, encoder=encoder,
                         options=IngestOptions(workers=2, batch_size=32, use_gpu=False, embed_files=embed_files))
    wall = time.perf_counter() - t
    return {"embedded": report.embedded, "failed": len(report.failed), "wall_s": round(wall, 2),
            "images_per_s": round(report.embedded / wall, 2)}


def free_embedding(paths, identity, limits, root=None):
    """An `embed_files` whose embedding costs nothing (reads and hashes each file, returns a fixed unit
    vector): what is left is the single writer's own cost per image (hash, rows, index adds, checkpoint)."""
    from index.decode import hash_bytes, read_bytes

    vector = np.zeros(int(identity["dim"]), np.float32)
    vector[0] = 1
    for i, path in enumerate(paths):
        data = read_bytes(path, limits.max_bytes, root=root)
        yield i, {"vector": vector, "digest": hash_bytes(data), "size": len(data), "width": 256, "height": 256,
                  "notes": []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--encoder", default="lipsim:demo")
    p.add_argument("--quick", action="store_true", help="24 images, lipsim:cpu-tiny")
    p.add_argument("--out", default="benchmarks/results/ray_embed_speed", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.encoder = 24, "lipsim:cpu-tiny"
    import ray

    from encoder import load_encoder
    from index.ray_embed import RayEmbedder

    encoder = load_encoder(args.encoder)
    rows = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            make_folder(tmp / "many", args.images)
            make_folder(tmp / "one" / "one", 1)
            rows["local, 1 image"] = timed_build(tmp / "one" / "one", tmp / "i-local-one", args.encoder, encoder)
            rows["Ray, 1 actor, 1 image (first Ray Data run)"] = timed_build(
                tmp / "one" / "one", tmp / "i-ray-first", args.encoder, encoder, RayEmbedder(actors=1))
            rows["Ray, 1 actor, 1 image"] = timed_build(tmp / "one" / "one", tmp / "i-ray-one", args.encoder, encoder,
                                                        RayEmbedder(actors=1))
            rows[f"local, {args.images} images"] = timed_build(tmp / "many", tmp / "i-local", args.encoder, encoder)
            for n in (1, 2):
                rows[f"Ray, {n} CPU actor{'s' * (n > 1)}, {args.images} images"] = timed_build(
                    tmp / "many", tmp / f"i-ray-{n}", args.encoder, encoder, RayEmbedder(actors=n))
            rows[f"writer only (embedding free), {args.images} images"] = timed_build(
                tmp / "many", tmp / "i-free", args.encoder, encoder, free_embedding)
    finally:
        ray.shutdown()
    overhead = rows["Ray, 1 actor, 1 image"]["wall_s"] - rows["local, 1 image"]["wall_s"]
    result = {"encoder": args.encoder, "images": args.images, "runs": rows,
              "per_actor_overhead_s": round(overhead, 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"encoder {args.encoder}; per-actor start-up overhead ≈ {overhead:.1f} s", "",
             "| run | embedded | wall (s) | images/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['embedded']} | {r['wall_s']} | {r['images_per_s']} |" for name, r in rows.items()]
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
