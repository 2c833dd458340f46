"""The CUDA paths, checked and timed on a machine with a GPU: one prepared run (a lent GPU gives minutes).

    python -m benchmarks.gpu_paths --out benchmarks/results/gpu-paths

1. Float error on CUDA: `encoder.protocol.measure_float_error` of lipsim:demo on the GPU and on the CPU (torch's
   TF32 settings as they are), and over the sample photos the largest ‖embed(x) − e(x)‖ of each float32 path,
   e a float64 copy on the CPU.
2. A gallery built on the GPU: `build_index` of the sample photos with the encoder on CUDA (what the ingest path
   picks when a GPU is visible); every stored vector against e(x) of its file's preprocessed input
   (`index.ingest.preprocess_bytes`), and the float error the catalog recorded.
3. Its certificates attacked: every sample photo, edited (JPEG 60, 10% darker), attacked with
   `retrieval.attacks.attack_query` — untargeted PGD ℓ2 at 0.95 × the top-5 set radius and targeted (the 2nd
   answer brought first) at 0.95 × the top-1 radius — with the query embedded on CUDA, then on the CPU, against
   the CUDA-built gallery. No certificate may be violated.
4. Throughput: images/s of lipsim:demo at batch 256, CUDA and CPU (inference mode, after a warm-up).
5. FAISS on the GPU when `faiss.get_num_gpus() > 0`: a flat index's top-10 on the GPU against the CPU's.
Exit status 1 on a violated certificate or a stored vector farther from e(x) than the recorded float error.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def _exact(enc):
    ref = copy.deepcopy(enc).to("cpu")
    if hasattr(ref, "unfreeze"):
        ref.unfreeze()
    return ref.double()


def _edited(path: Path):
    from PIL import Image, ImageEnhance

    buf = io.BytesIO()
    ImageEnhance.Brightness(Image.open(path).convert("RGB")).enhance(0.9).save(buf, "JPEG", quality=60)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def run(work: Path, steps: int, device: str = "cuda", photos_limit: int | None = None) -> dict:
    from encoder import load_encoder
    from encoder.protocol import measure_float_error
    from encoder.samples import export_sample_photos
    from index import Gallery
    from index.decode import DecodeLimits
    from index.ingest import IngestOptions, build_index, preprocess_bytes
    from retrieval.attacks import PGDConfig, attack_query
    from retrieval.attacks._embed import query_image
    from retrieval.search import search_image

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "device": device,
                    "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    gpu = load_encoder("lipsim:demo", device=device)
    cpu = load_encoder("lipsim:demo", device="cpu")
    exact = _exact(cpu)
    report["float_error_measured"] = {"cuda": measure_float_error(gpu), "cpu": measure_float_error(cpu)}

    photos = work / "photos"
    files = sorted(export_sample_photos(photos))[:photos_limit]
    if photos_limit:
        for extra in sorted(photos.iterdir())[photos_limit:]:
            extra.unlink()
    limits = DecodeLimits()
    inputs = [preprocess_bytes(f.read_bytes(), limits, cpu)[0] for f in files]
    x = torch.cat(inputs)
    with torch.no_grad():
        ref = exact._embed(x.double())
    with torch.inference_mode():
        worst = {"cuda": (gpu.embed(x.to(device)).double().cpu() - ref).norm(dim=1).max().item(),
                 "cpu": (cpu.embed(x).double() - ref).norm(dim=1).max().item()}
    report["sample_photos_error"] = worst

    build_index(photos, work / "index", "lipsim:demo",  # the encoder as the ingest path loads it (CUDA when visible)
                options=IngestOptions(workers=2, use_gpu=device != "cpu"))
    bad_vectors = 0
    with Gallery.open(work / "index", use_gpu=False) as g:
        recorded = g.float_error
        ids, stored = g.all_vectors()
        for i, v in zip(ids, stored):
            t = preprocess_bytes(Path(g.path(int(i))).read_bytes(), limits, cpu)[0]
            with torch.no_grad():
                e = exact._embed(t.double())[0].numpy()
            d = float(np.linalg.norm(v.astype(np.float64) - e))
            report.setdefault("stored_error_max", 0.0)
            report["stored_error_max"] = max(report["stored_error_max"], d)
            bad_vectors += d > recorded
    report["recorded_float_error"] = recorded
    report["stored_beyond_recorded"] = bad_vectors

    attacks = []
    for device, enc in (("cuda", gpu), ("cpu", cpu)):
        with Gallery.open(work / "index", encoder=enc, use_gpu=False) as g:
            for f in files:
                image = _edited(f)
                q = query_image(image)
                top5 = search_image(g, image, k=5)
                top1 = search_image(g, image, k=1)
                cases = [("untargeted", 5, None, top5.set_radius), ("targeted", 1, top5.hits[1].id, top1.set_radius)]
                for kind, k, target, radius in cases:
                    if not radius or radius <= 0:
                        continue
                    out = attack_query(g, q.x, kind=kind, k=k, target=target, layout=q.layout,
                                       config=PGDConfig(norm="l2", eps=0.95 * radius, steps=steps))
                    attacks.append({"device": device, "photo": f.stem, "kind": kind, "eps": 0.95 * radius,
                                    "ok": out.certificate is None or out.certificate.ok})
    report["attacks"] = {"run": len(attacks), "violated": sum(not a["ok"] for a in attacks),
                         "by_device": {d: sum(a["device"] == d for a in attacks) for d in ("cuda", "cpu")}}

    batch = torch.rand(256, 3, gpu.input_size, gpu.input_size)
    speed = {}
    for device, enc in (("cuda", gpu), ("cpu", cpu)):
        xb = batch.to(enc.device)
        on_gpu = enc.device.type == "cuda"
        with torch.inference_mode():
            enc.embed(xb)
            if on_gpu:
                torch.cuda.synchronize()
            t, reps = time.perf_counter(), 20 if on_gpu else 2
            for _ in range(reps):
                enc.embed(xb)
            if on_gpu:
                torch.cuda.synchronize()
        speed[device] = reps * len(batch) / (time.perf_counter() - t)
    report["images_per_s"] = speed

    import faiss

    report["faiss_gpus"] = faiss.get_num_gpus()
    if faiss.get_num_gpus() > 0:
        from index.store import VectorStore

        rng = np.random.default_rng(0)
        v = rng.standard_normal((200_000, 129)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        on_gpu = VectorStore.from_vectors(np.arange(len(v)), v, "Flat", use_gpu=True)
        on_cpu = VectorStore.from_vectors(np.arange(len(v)), v, "Flat", use_gpu=False)
        qs = v[:50] + 0.01 * rng.standard_normal((50, 129)).astype(np.float32)
        a, b = on_gpu.search(qs, 10), on_cpu.search(qs, 10)
        report["faiss_gpu"] = {"on_gpu": on_gpu.on_gpu, "same_ids": int((a[1] == b[1]).all(axis=1).sum()),
                               "max_score_diff": float(np.abs(a[0] - b[0]).max())}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="PGD steps per attack (default 50)")
    ap.add_argument("--photos", type=int, default=None, help="only the first N sample photos (default: all)")
    ap.add_argument("--device", default="cuda", help="the device checked (default cuda; cpu: a dry run of this script)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-paths"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_paths: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="robret-gpu-") as tmp:
        report = run(Path(tmp), args.steps, args.device, args.photos)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 1 if report["attacks"]["violated"] or report["stored_beyond_recorded"] else 0


if __name__ == "__main__":
    sys.exit(main())
