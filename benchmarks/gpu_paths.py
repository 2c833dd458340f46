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
   the CUDA-built gallery, opened as `robret query` opens it (mapped, its rows on torch's GPU when it sees one).
   No certificate may be violated.
4. Throughput: images/s of lipsim:demo at batch 256, CUDA and CPU (inference mode, after a warm-up).
5. Exact search on the GPU (`--sections faiss`), per gallery size, on the clustered unit vectors of
   benchmarks/certified_search.py, for two GPU stores beside the CPU's mapped store: FAISS's GPU index (a copying
   `VectorStore`; only when FAISS is built with GPU support) and a mapped Flat gallery's rows on torch's GPU
   (`index.mapped.MappedFlat` with `index.gpu_scan.DeviceRows`: what `Gallery.open` gives a Flat gallery):
   - the arithmetic check `index.store.gpu_arithmetic_ratio` of each GPU copy, and `on_gpu`;
   - the premise of every certificate over an exact list (retrieval/search.py): for each query, each GPU store's
     exact top-m (m = max(2k, k + 64)) against float64 scores of the *whole* gallery (torch, float64, on
     the GPU): the largest |GPU score − exact| over the listed items in units of `float32_dot_error`, and the
     largest  exact score of an unlisted item − (lowest exact score listed + 2·float32_dot_error), which must
     be ≤ 0;
   - certified top-10 (`search_embedding`) one query at a time on each store, in turn on every query: p50/p95
     latency, whether the top-10 ids are the CPU's, and the largest relative gap between radii (the lists' last
     items may differ where float32 scores tie: both certificates are sound);
   - a reload after a checkpoint that appended 1% new rows: torch's copy of the newer version made in full and
     sharing the older copy's rows (`index.gpu_scan.GpuCopy.seed`), alternating: seconds, device memory added,
     same top-10 as the CPU (for the Flat gallery, and for the IVF gallery below);
   - 1,000 queries' top-10 in one call on each store; a top-3000 search (beyond FAISS's GPU limit of 2048:
     FAISS's store must fall back to the CPU, and the raw GPU index's own error is recorded);
   - at the smallest size, an IVF gallery: FAISS's GPU nprobe search against the CPU's (same ids), and certified
     top-10 on torch's GPU (`index.mapped_ivf.LayeredIVF`: every vector there, exhaustive) against certified IVF on
     the CPU (the path of a reader without a GPU): latency, same top-10 ids.
Exit status 1 on a violated certificate, a stored vector farther from e(x) than the recorded float error,
or a broken premise.
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
        with Gallery.open(work / "index", encoder=enc) as g:  # a Flat gallery: its rows on torch's GPU (section 5)
            report.setdefault("attack_gallery_on_gpu", bool(getattr(g.store, "on_gpu", False)))
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

    return report


def faiss_checks(sizes, queries: int = 200, k: int = 10) -> dict:
    """Section 5 (module doc)."""
    import faiss

    from benchmarks._gallery import StoreGallery
    from benchmarks.certified_search import CLUSTER_SIZE, DIM, FLOAT_ERROR, clustered_unit_vectors, gallery_chunks
    from encoder.certify import float32_dot_error
    from index.ivf import CertifiedIVF
    from index.mapped import MappedFlat
    from index.mapped_ivf import LayeredIVF
    from index.store import GPU_MAX_K, VectorStore, gpu_arithmetic_ratio
    from retrieval.search import default_candidates

    out = {"faiss": faiss.__version__, "gpus": faiss.get_num_gpus(), "sizes": []}
    cuda = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    m = default_candidates(k)
    for n in sizes:
        row: dict = {"n": n}
        t = time.perf_counter()
        v = np.empty((n, DIM), np.float32)
        for ids, chunk in gallery_chunks(n, DIM)():
            v[ids[0]:ids[-1] + 1] = chunk
        row["generate_s"] = time.perf_counter() - t
        ids = np.arange(n, dtype=np.int64)
        stores = {}
        if faiss.get_num_gpus():  # FAISS's GPU index (a copying VectorStore: what IVF galleries use on a GPU)
            stores["gpu"] = VectorStore.from_vectors(ids, v, "Flat", use_gpu=True)
        stores["torch"] = MappedFlat(DIM, use_gpu=True)  # a mapped Flat gallery's rows on torch's GPU
        stores["cpu"] = MappedFlat(DIM)
        for name in ("torch", "cpu"):
            stores[name].add(ids, v, stored=True)
        for name in ("gpu", "torch"):
            if name in stores:
                t = time.perf_counter()
                row[f"{name}_on_gpu"] = stores[name].on_gpu
                row[f"{name}_to_gpu_s"] = time.perf_counter() - t  # (with the arithmetic check)
        if "gpu" in stores and stores["gpu"].gpu_index is not None:
            row["arithmetic_ratio"] = gpu_arithmetic_ratio(stores["gpu"].gpu_index, stores["gpu"])
        if stores["torch"].gpu.ready:
            row["torch_arithmetic_ratio"] = gpu_arithmetic_ratio(stores["torch"].gpu.copy, stores["torch"])
        qs = clustered_unit_vectors(queries, DIM, max(8, n // CLUSTER_SIZE), 0, stream=7)

        # the premise, against float64 scores of the whole gallery
        all64 = torch.from_numpy(v).to(cuda, torch.float64)
        q64 = torch.from_numpy(qs).to(cuda, torch.float64)
        found = {name: stores[name].search(qs, m, exact=True) for name in ("gpu", "torch") if name in stores}
        premise = {name: {"listed": m, "max_error_over_bound": 0.0, "max_unlisted_excess": -np.inf} for name in found}
        for r in range(queries):
            exact = (all64 @ q64[r]).cpu().numpy()
            gamma = float32_dot_error(DIM, 1.0 + 1e-6, float(np.linalg.norm(qs[r])))
            for name, (s_gpu, i_gpu) in found.items():
                p = premise[name]
                listed = i_gpu[r][i_gpu[r] >= 0]
                p["max_error_over_bound"] = max(p["max_error_over_bound"],
                                                float(np.max(np.abs(s_gpu[r][:len(listed)] - exact[listed]))) / gamma)
                outside = np.ones(n, bool)
                outside[listed] = False
                p["max_unlisted_excess"] = max(p["max_unlisted_excess"],
                                               float(exact[outside].max() - (exact[listed].min() + 2 * gamma)))
        for p in premise.values():
            p["holds"] = bool(p["max_unlisted_excess"] <= 0 and p["max_error_over_bound"] <= 1)
        del all64, q64
        row["premise"] = premise

        # certified top-k, one query at a time, the stores in turn on each query
        galleries = {name: StoreGallery(store, None, 1.0 + 1e-6, FLOAT_ERROR) for name, store in stores.items()}
        times = {name: [] for name in galleries}
        same = {name: 0 for name in galleries if name != "cpu"}
        gap = {name: 0.0 for name in same}
        for answers in _certified_in_turn(galleries, qs, k, times):
            b = answers["cpu"]
            rb = np.array([h.radius for h in b.hits])
            for name in same:
                a = answers[name]
                same[name] += [h.id for h in a.hits] == [h.id for h in b.hits]
                ra = np.array([h.radius for h in a.hits])
                gap[name] = max(gap[name], float(np.max(np.abs(ra - rb) / np.maximum(rb, 1e-12))))
        row["certified_top10"] = {name: {"p50_ms": float(np.median(x)), "p95_ms": float(np.percentile(x, 95))}
                                  for name, x in times.items()}
        # radii differ slightly when the two lists differ in their last item (ties in float32): both sound
        row["certified_top10"].update(same_ids_as_cpu=same, max_relative_radius_gap=gap, queries=queries)

        if stores["torch"].gpu.ready:
            def flat(use_gpu, ids=ids, v=v):
                store = MappedFlat(DIM, use_gpu=use_gpu)
                store.add(ids, v, stored=True)
                return store
            row["reload"] = _reload_copy(stores["torch"], _appended(flat, v), qs[:20], k)

        batch = clustered_unit_vectors(1000, DIM, max(8, n // CLUSTER_SIZE), 0, stream=8)
        answers = {}
        for name, store in stores.items():
            store.search(batch[:10], k)
            t = time.perf_counter()
            answers[name] = store.search(batch, k)[1]
            row[f"batch1000_{name}_s"] = time.perf_counter() - t
        row["batch1000_same_ids_as_cpu"] = {name: int((answers[name] == answers["cpu"]).all(axis=1).sum())
                                            for name in answers if name != "cpu"}

        deep = GPU_MAX_K + 952
        if "gpu" in stores:
            try:
                stores["gpu"].gpu_index.search(qs[:1], deep) if stores["gpu"].gpu_index is not None else None
                row["raw_gpu_k3000"] = "ok"
            except Exception as exc:  # FAISS's own limit on the GPU
                row["raw_gpu_k3000"] = str(exc).strip().splitlines()[-1][:200]
        b = stores["cpu"].search(qs[:2], deep, exact=True)
        row["k3000_max_score_diff_vs_cpu"] = {  # (ids may swap where scores tie)
            name: float(np.abs(stores[name].search(qs[:2], deep, exact=True)[0] - b[0]).max())
            for name in stores if name != "cpu"}

        if n == min(sizes):  # an IVF gallery ("auto" from 1M vectors): on FAISS's GPU, and on torch's
            nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
            t = time.perf_counter()
            ivf_cpu = VectorStore.from_vectors(ids, v, f"IVF{nlist},Flat", use_gpu=False)
            row["ivf_train_s"] = time.perf_counter() - t
            row["ivf"] = {"factory": ivf_cpu.factory, "nprobe": ivf_cpu.params["nprobe"]}
            if "gpu" in stores:
                ivf_gpu = VectorStore(ivf_cpu.index, ivf_cpu.factory, ivf_cpu.params, use_gpu=True)
                a, b = ivf_gpu.search(batch, k), ivf_cpu.search(batch, k)
                row["ivf"].update(on_gpu=ivf_gpu.on_gpu, same_ids=int((a[1] == b[1]).all(axis=1).sum()),
                                  queries=len(batch), max_score_diff=float(np.abs(a[0] - b[0]).max()))
                del ivf_gpu
            # torch's GPU (a reader where FAISS sees none: index.mapped_ivf.LayeredIVF) against certified IVF on the CPU
            ivf_torch = LayeredIVF(ivf_cpu, use_gpu=True)
            t = time.perf_counter()
            row["ivf"]["torch_on_gpu"] = ivf_torch.on_gpu
            row["ivf"]["torch_to_gpu_s"] = time.perf_counter() - t  # (reconstructing every vector, and the check)
            pair = {"torch": StoreGallery(ivf_torch, None, 1.0 + 1e-6, FLOAT_ERROR),
                    "cpu_certified_ivf": StoreGallery(ivf_cpu, CertifiedIVF.from_faiss(ivf_cpu.index), 1.0 + 1e-6,
                                                      FLOAT_ERROR)}
            took, same, exhaustive = {name: [] for name in pair}, 0, 0
            for answers in _certified_in_turn(pair, qs, k, took):
                same += [h.id for h in answers["torch"].hits] == [h.id for h in answers["cpu_certified_ivf"].hits]
                exhaustive += bool(answers["cpu_certified_ivf"].exhaustive)
            row["ivf"]["certified_top10"] = {name: {"p50_ms": float(np.median(x)), "p95_ms": float(np.percentile(x, 95))}
                                             for name, x in took.items()}
            row["ivf"]["certified_top10"].update(same_ids=same, cpu_exhaustive_certificates=exhaustive,
                                                 queries=len(qs))
            if ivf_torch.gpu.ready:  # a reload: the base's vectors shared, the segment's rows copied
                row["ivf"]["reload"] = _reload_copy(ivf_torch, _appended(
                    lambda use_gpu: LayeredIVF(ivf_cpu, use_gpu=use_gpu), v), qs[:20], k)
            del ivf_torch, ivf_cpu, pair
        del stores, galleries, v
        out["sizes"].append(row)
        print(json.dumps(row), flush=True)
    return out


def _reload_copy(older, newer, qs: np.ndarray, k: int, rounds: int = 3) -> dict:
    """A server's reload after a checkpoint that appended a segment to the gallery `older` holds (its copy made):
    `newer(use_gpu)` builds the grown store; its GPU copy made in full, and sharing the older copy's parts
    (`GpuCopy.seed` with every older row, what `Gallery.prepare_search(previous=…)` does), `rounds` times each in
    alternating order (seconds, with the arithmetic check); the device memory each copy adds (CUDA only), the rows
    shared, and the shared copy's exact top-k against the CPU's search of the same store."""
    cuda = older.gpu.copy.device.type == "cuda"
    rows = older.gpu.copy.n
    out = {"rows_before": rows, "copy_s": {"full": [], "shared": []}, "added_bytes": {}}
    for r in range(rounds):
        for how in (("full", "shared") if r % 2 == 0 else ("shared", "full")):
            store = newer(True)
            if how == "shared":
                store.gpu.seed(older.gpu, rows)
            if cuda:
                torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() if cuda else 0
            t = time.perf_counter()
            on = store.on_gpu
            if cuda:
                torch.cuda.synchronize()
            out["copy_s"][how].append(time.perf_counter() - t)
            out["added_bytes"][how] = (torch.cuda.memory_allocated() - before) if cuda else None
            if how == "shared" and r == 0:
                cpu = newer(False)
                same = (store.search(qs, k, exact=True)[1] == cpu.search(qs, k, exact=True)[1]).all(axis=1)
                out.update(on_gpu=on, rows_after=store.gpu.copy.n, reused=store.gpu.copy.reused,
                           same_ids_as_cpu=int(same.sum()), queries=len(qs))
                del cpu
            del store
    out["ratio_full_over_shared"] = float(np.median(out["copy_s"]["full"]) / np.median(out["copy_s"]["shared"]))
    return out


def _appended(make, v: np.ndarray, share: float = 0.01):
    """newer(use_gpu) for `_reload_copy`: `make(use_gpu)` (the older gallery's store, rebuilt) with a segment of
    `share`·n fresh unit rows appended under new ids."""
    n, dim = v.shape
    fresh = np.random.default_rng(5).standard_normal((max(1, int(n * share)), dim)).astype(np.float32)
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)

    def newer(use_gpu):
        store = make(use_gpu)
        store.add(np.arange(n, n + len(fresh)), fresh, stored=True)
        return store
    return newer


def _certified_in_turn(galleries: dict, qs, k: int, times: dict):
    """For each query, {name: `search_embedding` on each gallery in turn}, its milliseconds appended to times[name]
    (each gallery searched once first, to warm it)."""
    from retrieval.search import search_embedding

    for g in galleries.values():
        search_embedding(g, qs[0], k)
    for q in qs:
        answers = {}
        for name, g in galleries.items():
            t = time.perf_counter()
            answers[name] = search_embedding(g, q, k)
            times[name].append(1000 * (time.perf_counter() - t))
        yield answers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="PGD steps per attack (default 50)")
    ap.add_argument("--photos", type=int, default=None, help="only the first N sample photos (default: all)")
    ap.add_argument("--device", default="cuda", help="the device checked (default cuda; cpu: a dry run of this script)")
    ap.add_argument("--sections", default="encoder,faiss",
                    help="comma-separated: encoder (1-4), faiss (5) (default both)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000],
                    help="gallery sizes of the FAISS section (default 1000000 10000000)")
    ap.add_argument("--queries", type=int, default=200, help="queries per size in the FAISS section (default 200)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-paths"))
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_paths: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    report: dict = {}
    if "encoder" in sections:
        with tempfile.TemporaryDirectory(prefix="robret-gpu-") as tmp:
            report = run(Path(tmp), args.steps, args.device, args.photos)
    if "faiss" in sections:
        report["faiss_gpu"] = faiss_checks(args.sizes, args.queries)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = report.get("attacks", {}).get("violated") or report.get("stored_beyond_recorded")
    failed = failed or any(not p["holds"] for r in report.get("faiss_gpu", {}).get("sizes", [])
                           for p in r["premise"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
