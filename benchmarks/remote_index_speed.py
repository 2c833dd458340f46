"""Index build speed from a local folder vs from S3 (a moto S3 server on loopback), side by side.

The same distinct JPEGs (crops of the bundled sample photos, benchmarks/ray_embed_speed.py) are written
to a folder and uploaded under `s3://bench/photos` of a moto server on 127.0.0.1; each round builds a
fresh index from the folder and one from the prefix (alternating, so machine load hits both alike).
images/s = embedded files / wall seconds of the whole build (list, read, hash, decode, embed, write).
"read only" times the read path alone (listing + `index.decode.read_bytes` of every file, one thread):
what object storage costs per file before any decoding.

Loopback S3 has no network latency or bandwidth limit: the gap measured is pyarrow's S3 client and the
HTTP round trips (a HEAD and ranged GETs per object), a lower bound for a real bucket.

    python -m benchmarks.remote_index_speed [--images 240] [--encoder lipsim:demo] [--rounds 2] [--quick]
                                            [--out benchmarks/results/remote_index_speed]

--quick: 16 images, the tiny random encoder, one round (seconds).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._output import write_report
from benchmarks.ray_embed_speed import make_folder, timed_build

BUCKET = "bench"


def start_s3() -> tuple[object, str]:
    """A moto S3 server on a free loopback port; (server, endpoint). Dummy credentials in this process only."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["ROBRET_S3_ENDPOINT"] = endpoint
    return server, endpoint


def upload(folder: Path, endpoint: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(folder.iterdir()):
        client.put_object(Bucket=BUCKET, Key=f"photos/{path.name}", Body=path.read_bytes())
    return f"s3://{BUCKET}/photos"


def read_all(source: str) -> dict:
    """List `source` and read every file through read_bytes (confined to the source), one thread."""
    from index.decode import DecodeLimits, read_bytes
    from index.sources import resolve_source, scan_source

    t = time.perf_counter()
    src = resolve_source(source)
    entries = scan_source(src).entries
    total = sum(len(read_bytes(e.path, DecodeLimits().max_bytes, root=src.root)) for e in entries)
    wall = time.perf_counter() - t
    return {"files": len(entries), "mb": round(total / 2**20, 2), "wall_s": round(wall, 3),
            "files_per_s": round(len(entries) / wall, 1), "mb_per_s": round(total / 2**20 / wall, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--encoder", default="lipsim:demo")
    p.add_argument("--rounds", type=int, default=2, help="alternating local/S3 builds per side (median reported)")
    p.add_argument("--quick", action="store_true", help="16 images, lipsim:cpu-tiny, one round")
    p.add_argument("--out", default="benchmarks/results/remote_index_speed", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.encoder, args.rounds = 16, "lipsim:cpu-tiny", 1

    import torch

    from encoder import load_encoder

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    encoder = load_encoder(args.encoder)
    saved = dict(os.environ)
    server, endpoint = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "photos"
            make_folder(folder, args.images)
            uri = upload(folder, endpoint)
            runs = {"local": [], "s3": []}
            reads = {"local": read_all(str(folder)), "s3": read_all(uri)}
            for r in range(args.rounds):
                for side, source in (("local", folder), ("s3", uri)):
                    runs[side].append(timed_build(source, Path(tmp) / f"{side}-{r}", args.encoder, encoder))
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
    builds = {side: {"runs": rs, "median_images_per_s": statistics.median(x["images_per_s"] for x in rs),
                     "median_wall_s": statistics.median(x["wall_s"] for x in rs)} for side, rs in runs.items()}
    report = {"images": args.images, "encoder": args.encoder, "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "load_average_at_end": list(os.getloadavg()), "build": builds, "read_only": reads,
              "s3_over_local_build": round(builds["local"]["median_images_per_s"]
                                           / max(builds["s3"]["median_images_per_s"], 1e-9), 3)}
    lines = [f"| {args.images} JPEGs, {args.encoder}, median of {args.rounds} | local folder | S3 (moto, loopback) |",
             "|---|---|---|",
             f"| build images/s | {builds['local']['median_images_per_s']:.1f} | {builds['s3']['median_images_per_s']:.1f} |",
             f"| build wall (s) | {builds['local']['median_wall_s']:.2f} | {builds['s3']['median_wall_s']:.2f} |",
             f"| read only: files/s | {reads['local']['files_per_s']:.0f} | {reads['s3']['files_per_s']:.0f} |",
             f"| read only: MB/s | {reads['local']['mb_per_s']:.1f} | {reads['s3']['mb_per_s']:.1f} |", ""]
    return write_report(args.out, report, "\n".join(lines))


if __name__ == "__main__":
    main()
