"""Load test of `robret serve`: latency percentiles and throughput of certified searches over HTTP.

Starts `robret serve` in its own process on a free 127.0.0.1 port (loopback only), on the demo index of
the bundled sample photos (built in a temporary directory, or --index-dir), then sends a fixed number
of POST /search requests (each a sample photo as an upload, k=10, eps given: certificates on) from a
fixed number of client threads, and stops. It reports p50/p95/p99 latency, throughput, the number of
non-200 answers (must be 0) and the server's resident memory (VmRSS from /proc) after a warm-up and
after the run.

    python -m benchmarks.serve_load [--requests 500] [--concurrency 8] [--index-dir DIR] [--quick]
                                    [--out benchmarks/results/serve_load]

--quick: a 6-photo index with the tiny random encoder (lipsim:cpu-tiny), 40 requests, 4 threads (seconds).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def upload_body(data: bytes, k: int, eps: float) -> tuple[bytes, dict]:
    b = uuid.uuid4().hex
    head = (f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="eps"\r\n\r\n{eps}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + data + f"\r\n--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}


def call(port: int, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"robret serve exited with {proc.returncode}")
        try:
            if call(port, "GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("robret serve did not start in time")


def build_demo_index(tmp: Path, encoder: str, photos: int | None) -> Path:
    from encoder.samples import export_sample_photos
    from index import IngestOptions, build_index

    folder = tmp / "photos"
    export_sample_photos(folder)
    if photos is not None:
        for extra in sorted(folder.iterdir())[photos:]:
            extra.unlink()
    build_index(folder, tmp / "index", encoder, options=IngestOptions(workers=1))
    return tmp / "index"


def run(index_dir: Path, queries: list[bytes], requests: int, concurrency: int, eps: float) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("ROBRET_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index-dir", str(index_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--concurrency", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(proc, port)
        bodies = [upload_body(q, 10, eps) for q in queries]
        for body, headers in bodies:  # warm-up: every query once
            status, text = call(port, "POST", "/search", body, headers)
            if status != 200:
                raise RuntimeError(f"warm-up query answered {status}: {text[:300]!r}")
        rss_before = rss_mb(proc.pid)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        certified = 0
        lock = threading.Lock()

        def one(i: int) -> None:
            nonlocal certified
            body, headers = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                status, text = call(port, "POST", "/search", body, headers)
            except OSError:
                status, text = -1, b""
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200 and json.loads(text).get("set_radius") is not None:
                    certified += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
        rss_after = rss_mb(proc.pid)
        stats = json.loads(call(port, "GET", "/stats")[1])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = np.asarray(latencies) * 1000
    return {
        "index_dir": str(index_dir), "encoder": stats["index"]["encoder"]["spec"], "items": stats["serving"]["items"],
        "requests": requests, "concurrency": concurrency, "eps": eps, "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 2),
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "errors": requests - statuses.get(200, 0), "statuses": {str(k): v for k, v in statuses.items()},
        "certified_answers": certified, "server_rss_mb": {"after_warmup": round(rss_before, 1),
                                                          "after_run": round(rss_after, 1)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index-dir", default=None, help="index to serve (default: a demo index built in a temp dir)")
    p.add_argument("--encoder", default="lipsim:demo", help="encoder of the demo index (default lipsim:demo)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--eps", type=float, default=0.1, help="ℓ2 radius each answer is certified against")
    p.add_argument("--quick", action="store_true", help="tiny encoder, 6 photos, 40 requests, 4 threads")
    p.add_argument("--out", default="benchmarks/results/serve_load", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    if args.quick:
        args.encoder, args.requests, args.concurrency = "lipsim:cpu-tiny", 40, 4
    from encoder.samples import export_sample_photos

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index_dir = Path(args.index_dir) if args.index_dir else build_demo_index(tmp, args.encoder,
                                                                                 6 if args.quick else None)
        export_sample_photos(tmp / "queries")
        queries = [f.read_bytes() for f in sorted((tmp / "queries").iterdir()) if f.stat().st_size < 600_000][:8]
        result = run(index_dir, queries, args.requests, args.concurrency, args.eps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lat, rss = result["latency_ms"], result["server_rss_mb"]
    table = ("| encoder | items | requests × threads | p50 / p95 / p99 (ms) | throughput (req/s) | errors | "
             "certified | server RSS warm → after (MB) |\n|---|---|---|---|---|---|---|---|\n"
             f"| {result['encoder']} | {result['items']} | {result['requests']} × {result['concurrency']} | "
             f"{lat['p50']} / {lat['p95']} / {lat['p99']} | {result['throughput_rps']} | {result['errors']} | "
             f"{result['certified_answers']} | {rss['after_warmup']} → {rss['after_run']} |\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
