"""Embedding throughput: LipSim presets against the DreamSim architectures, in images per second.

RANDOM WEIGHTS everywhere (speed does not depend on the values): LipSim presets are built from their
shapes; the DreamSim architectures are dreamsim's own PerceptualModel + peft LoRA (r=16 on qkv, as
dreamsim() wraps them), with its ViTExtractor building random ViTs in the layouts its loaders
produce (DINO: the DINO ViT; CLIP/OpenCLIP: that ViT with ln_pre, QuickGELU for CLIP, a 768×512
projection) instead of reading checkpoints. Nothing is downloaded.

Three measurements, each printed as a Markdown table and written to OUT/throughput.{json,md}:
  1. every model × batch size: images/s and analytical GFLOPs per image (convolutions, linear
     layers, attention matrix products, LoRA; elementwise work not counted);
  2. the ratio LipSim-small (folded) / DreamSim ensemble, the two measured in alternation in the
     same run at each batch size (so that load from other processes hits both alike);
  3. LipSim-small, step by step (what each optimisation buys), in alternation with the ensemble,
     with each step's max |Δ| against the reference (unfrozen, layer by layer) embedding.

    python -m benchmarks.throughput                    # CPU (GPU with --device cuda), ~25 min on 2 busy cores
    python -m benchmarks.throughput --quick            # seconds: cpu presets, no DreamSim
    python -m benchmarks.throughput --compile          # add torch.compile steps (minutes to compile)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput"
LIPSIM_MODES = ("train-form", "folded")
DREAMSIM_ARCHS = ("ensemble", "dino_vitb16", "clip_vitb16", "open_clip_vitb16", "clip_vitb32")
LORA = dict(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=["qkv"])


# --------------------------------------------------------------------------------------------
# Analytical FLOPs (2 per multiply-add; matrix products and convolutions only)
# --------------------------------------------------------------------------------------------
def lipsim_flops(config) -> dict[str, float]:
    """{'per_image': folded forward, 'train_form_per_batch': the T⁻¹ computation each unfrozen forward adds}."""
    k2 = config.kernel_size**2
    conv = config.conv_depth * 2 * 2 * config.input_size**2 * config.conv_inner * config.channels * k2
    dense = config.linear_depth * 2 * 2 * config.features * config.linear_inner
    gram_conv = config.conv_depth * 2 * config.conv_inner**2 * (2 * config.kernel_size - 1) ** 2 * config.channels * k2
    gram_dense = config.linear_depth * 2 * config.linear_inner**2 * config.features
    return {"per_image": conv + dense, "train_form_per_batch": gram_conv + gram_dense}


def vit_flops(patch: int, image: int = 224, dim: int = 768, depth: int = 12, mlp_ratio: int = 4,
              lora_r: int = 0, proj_out: int = 0) -> float:
    """ViT forward: patch embedding, per block qkv/attention (QKᵀ, AV)/projection/MLP, LoRA, output projection."""
    patches = (image // patch) ** 2
    n = patches + 1
    macs = patches * dim * 3 * patch**2
    block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * mlp_ratio * dim
    block += n * lora_r * (dim + 3 * dim)  # LoRA on qkv: x·A (dim→r), ·B (r→3·dim)
    macs += depth * block + proj_out * dim
    return 2.0 * macs


def dreamsim_flops(arch: str) -> float:
    branches = _ARCH_BRANCHES[arch]
    return sum(vit_flops(int(m[-2:]), lora_r=LORA["r"], proj_out=512 if f == "embedding" else 0)
               for m, f in branches)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
# (model_type, feat_type) per branch, as in dreamsim.config (the ensemble's branches taken alone).
_ARCH_BRANCHES = {
    "ensemble": (("dino_vitb16", "cls"), ("clip_vitb16", "embedding"), ("open_clip_vitb16", "embedding")),
    "dino_vitb16": (("dino_vitb16", "cls"),),
    "clip_vitb16": (("clip_vitb16", "embedding"),),
    "open_clip_vitb16": (("open_clip_vitb16", "embedding"),),
    "clip_vitb32": (("clip_vitb32", "embedding"),),
}


def _random_vit(model_type: str, load_dir: str = ""):
    """What ViTExtractor.create_model returns for `model_type`, with random weights and no file read."""
    from dreamsim.feature_extraction.load_clip_as_dino import QuickGELU
    from dreamsim.feature_extraction.vision_transformer import DINOHead, vit_base

    vit = vit_base(patch_size=int(model_type[-2:]))
    if model_type.startswith("dino"):
        return vit, DINOHead(768, 2048)  # the head dino_vitb16 comes with (unused for 'cls' features)
    vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)  # load_(open_)clip_as_dino: ln_pre
    if not model_type.startswith("open_clip"):
        for blk in vit.blocks:
            blk.mlp.act = QuickGELU()
    for m in vit.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    return vit, torch.randn(vit.embed_dim, 512) / math.sqrt(vit.embed_dim)


def build_dreamsim_arch(arch: str, device: str = "cpu") -> torch.nn.Module:
    """dreamsim's PerceptualModel for `arch` with random ViTs, wrapped in LoRA as dreamsim() does."""
    from dreamsim.feature_extraction.extractor import ViTExtractor
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    branches = _ARCH_BRANCHES[arch]
    strides = ",".join(m[-2:] for m, _ in branches)
    # Scoped to this construction: ViTExtractor's real __init__ runs, on random ViTs instead of files.
    with mock.patch.object(ViTExtractor, "create_model", staticmethod(_random_vit)):
        model = PerceptualModel(model_type=",".join(m for m, _ in branches), feat_type=",".join(f for _, f in branches),
                                stride=strides, lora=True, device=device, normalize_embeds=True)
    model = get_peft_model(model, LoraConfig(**LORA))
    return model.to(device).eval().requires_grad_(False)


def build_lipsim(preset: str, mode: str, device: str = "cpu"):
    from encoder.lipsim import LipSimEncoder
    from encoder.presets import PRESETS

    torch.manual_seed(0)
    enc = LipSimEncoder(PRESETS[preset], name=f"lipsim:{preset} (random weights)").to(device).eval()
    if mode == "folded":
        enc.freeze()
    return enc


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclass
class Timer:
    """Times `fn(x)` (a batch) repeatedly; images/s of the best, median and worst of `rounds` rounds."""

    fn: Callable
    x: torch.Tensor
    threads: int | None = None
    samples: list[float] = field(default_factory=list)  # images per second (wall clock)
    cpu_samples: list[float] = field(default_factory=list)  # images per CPU-second of this process

    def run(self, min_time: float, min_iters: int = 1) -> float:
        with self._threads(), torch.no_grad():
            iters, start, cpu = 0, time.perf_counter(), time.process_time()
            while True:
                self.fn(self.x)
                _sync(self.x)
                iters += 1
                elapsed = time.perf_counter() - start
                if iters >= min_iters and elapsed >= min_time:
                    break
        rate = iters * self.x.shape[0] / elapsed
        self.samples.append(rate)
        self.cpu_samples.append(iters * self.x.shape[0] / max(time.process_time() - cpu, 1e-9))
        return rate

    def warmup(self) -> None:
        with self._threads(), torch.no_grad():
            self.fn(self.x)
            _sync(self.x)

    @contextlib.contextmanager
    def _threads(self):
        if self.threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def alternate(timers: dict[str, Timer], rounds: int, min_time: float, warm: bool = False) -> None:
    """Round-robin: every round times each timer once, so slow phases of a shared machine hit all."""
    for t in timers.values():
        if not warm:
            t.warmup()
    for _ in range(rounds):
        for t in timers.values():
            t.run(min_time)


def _images(batch: int, size: int, device: str) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)


# --------------------------------------------------------------------------------------------
# LipSim-small step by step
# --------------------------------------------------------------------------------------------
def _pure_folded(net, memory_format=torch.contiguous_format):
    """The folded network, layer by layer with conv2d / conv_transpose2d (the formulas of the layers'
    frozen forward, without the inference kernels), as one function of tensors so that torch.compile
    sees a single graph: the layers' stale-fold checks would break it at every layer."""
    cfg = net.config
    p = cfg.kernel_size // 2
    conv = [(l.kernel, l.bias.reshape(-1), l._folded) for l in net.convs]
    dense = [(l.weight, l.bias.reshape(-1), l._folded) for l in net.linear]

    def f(x):
        if net.mean is not None:
            x = (x - net.mean) / net.std
        x = F.pad(x, (0, 0, 0, 0, 0, cfg.channels - x.shape[1])).contiguous(memory_format=memory_format)
        for k, b, kf in conv:
            x = x - F.conv_transpose2d(F.relu(F.conv2d(x, k, b, padding=p)), kf, padding=p)
        for _ in range(cfg.pools):
            x = F.avg_pool2d(x, cfg.pool_size, divisor_override=cfg.pool_size)
        x = x.flatten(1)
        for w, b, wf in dense:
            x = x - F.relu(F.linear(x, w, b)) @ wf
        x = x[:, : cfg.embed_dim]
        e = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return e / e.norm(dim=1, keepdim=True)

    return f


def lipsim_steps(device: str, threads: int, compile_steps: bool) -> dict[str, tuple[Callable, int | None, str]]:
    """name → (fn(x) → embedding, threads, what changed); the first is the reference."""
    from encoder._sll_inference import _THREADS_LOCK

    unfrozen = build_lipsim("small", "train-form", device)
    folded = build_lipsim("small", "folded", device)

    def single_stream(x):
        with _THREADS_LOCK:  # held: the kernels run the batch on the calling thread (intra-op threads)
            return folded.embed(x)

    steps = {
        # unfrozen, embed takes each layer's own forward: T⁻¹ recomputed, conv2d + conv_transpose2d
        "0 reference: unfrozen (T⁻¹ recomputed each call), conv2d + conv_transpose2d": (unfrozen.embed, 1, "—"),
        "1 folded inference form (freeze())": (_pure_folded(folded.net), 1, "T⁻¹ folded once"),
        "2 + channels_last memory layout": (
            _pure_folded(folded.net, torch.channels_last), 1, "oneDNN NHWC convolutions"),
    }
    if device == "cpu":
        steps["3 conv pair as two 45×45 GEMMs + fused residual, image by image"] = (
            folded.embed, 1, "encoder/_sll_inference.py")
        if threads > 1:
            steps[f"4a the same, {threads} intra-op threads on each image"] = (single_stream, threads, "threads")
            steps[f"4b the same, {threads} images at a time on 1 thread each (library default)"] = (
                folded.embed, threads, "threads")
    else:
        steps["3 same-device default (cuDNN convolutions)"] = (folded.embed, None, "")
    if compile_steps:
        compiled = torch.compile(_pure_folded(folded.net, torch.channels_last))
        steps["5 torch.compile (inductor) of step 2, 1 thread"] = (compiled, 1, "inductor: fused elementwise")
    return steps


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def _fmt_rate(r: float) -> str:
    return f"{r:.3g}" if r < 100 else f"{r:.0f}"


def run_table(presets, archs, batch_sizes, device, rounds, min_time, slow: float = 20.0) -> list[dict]:
    """Each model alone (built, timed, freed); one batch slower than `slow` seconds is timed once."""
    from encoder.presets import PRESETS

    rows = []
    models: list[tuple[str, str, Callable[[], Callable], float, int]] = []
    for p in presets:
        fl = lipsim_flops(PRESETS[p])
        for mode in LIPSIM_MODES:
            models.append((f"lipsim:{p}", mode, lambda p=p, mode=mode: build_lipsim(p, mode, device).embed,
                           fl["per_image"], PRESETS[p].input_size))
    for a in archs:
        models.append((f"dreamsim:{a}", "eval", lambda a=a: build_dreamsim_arch(a, device).embed,
                       dreamsim_flops(a), 224))
    for name, mode, build, flops, size in models:
        fn = build()
        for b in batch_sizes:
            timer = Timer(fn, _images(b, size, device))
            start = time.perf_counter()
            timer.run(0)  # warm-up; a model this slow keeps it as its only sample
            if time.perf_counter() - start < slow:
                timer.samples.clear()
                alternate({name: timer}, rounds, min_time, warm=True)
            rate = timer.median
            row = {"model": name, "mode": mode, "batch": b, "images_per_s": rate,
                   "gflops_per_image": flops / 1e9, "achieved_gflops": rate * flops / 1e9,
                   "samples": timer.samples}
            if mode == "train-form":
                row["train_form_gflops_per_batch"] = lipsim_flops(PRESETS[name.split(":")[1]])["train_form_per_batch"] / 1e9
            rows.append(row)
            print(f"  {name:<24} {mode:<10} B={b:<3} {_fmt_rate(rate):>8} img/s", flush=True)
        del fn
        gc.collect()
    return rows


def run_ratio(batch_sizes, device, rounds, min_time) -> list[dict]:
    """LipSim-small (folded) and the ensemble in alternation, per batch size and thread count."""
    small = build_lipsim("small", "folded", device)
    ensemble = build_dreamsim_arch("ensemble", device)
    threads = torch.get_num_threads()
    out = []
    for th in ([threads, 1] if device == "cpu" and threads > 1 else [threads]):
        for b in batch_sizes:
            timers = {"lipsim": Timer(small.embed, _images(b, 224, device), th),
                      "ensemble": Timer(ensemble.embed, _images(b, 224, device), th)}
            alternate(timers, rounds, min_time)
            ratios = [a / e for a, e in zip(timers["lipsim"].samples, timers["ensemble"].samples)]
            cpu = [a / e for a, e in zip(timers["lipsim"].cpu_samples, timers["ensemble"].cpu_samples)]
            out.append({"batch": b, "threads": th, "lipsim_small_images_per_s": timers["lipsim"].median,
                        "ensemble_images_per_s": timers["ensemble"].median, "ratio": statistics.median(ratios),
                        "ratio_per_round": ratios, "cpu_time_ratio": statistics.median(cpu)})
            print(f"  threads={th} B={b:<3} lipsim:small {_fmt_rate(timers['lipsim'].median)} img/s, ensemble "
                  f"{_fmt_rate(timers['ensemble'].median)} img/s, ratio {statistics.median(ratios):.2f}", flush=True)
    return out


def run_steps(batch, device, rounds, min_time, compile_steps) -> list[dict]:
    threads = torch.get_num_threads()
    steps = lipsim_steps(device, threads, compile_steps)
    x = _images(batch, 224, device)
    outputs = {}
    with torch.no_grad():
        for name, (fn, th, _) in list(steps.items()):
            try:
                outputs[name] = fn(x)
            except Exception as exc:  # torch.compile needs a working C++ toolchain; report, go on
                print(f"  step {name!r} failed: {type(exc).__name__}: {exc}", flush=True)
                del steps[name]
    reference = next(iter(outputs.values()))
    ensemble = build_dreamsim_arch("ensemble", device)
    timers = {name: Timer(fn, x, th) for name, (fn, th, _) in steps.items()}
    timers["DreamSim ensemble, 1 thread"] = Timer(ensemble.embed, x, 1)
    if device == "cpu" and threads > 1:
        timers[f"DreamSim ensemble, {threads} threads"] = Timer(ensemble.embed, x, threads)
    alternate(timers, rounds, min_time)
    rows, previous = [], None
    for name, timer in timers.items():
        row = {"step": name, "threads": timer.threads or threads, "images_per_s": timer.median, "samples": timer.samples,
               "images_per_cpu_s": timer.cpu_median}
        if name in steps:
            row["what"] = steps[name][2]
            row["max_abs_diff_vs_reference"] = float((outputs[name] - reference).abs().max())
            row["speedup_vs_previous"] = timer.median / previous if previous else None
            row["speedup_vs_reference"] = timer.median / timers[next(iter(steps))].median
            previous = timer.median
        rows.append(row)
    ens = {t.threads or threads: t.median for name, t in timers.items() if name.startswith("DreamSim")}
    for row in rows:
        row["ratio_vs_ensemble_same_threads"] = row["images_per_s"] / ens.get(row["threads"], ens[1])
    return rows


def markdown(result: dict) -> str:
    load = "; load average {} at the start, {} at the end (1, 5, 15 min)".format(
        *(", ".join(f"{v:.1f}" for v in result[k]) for k in ("load_average_start", "load_average_end")))
    lines = [f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} threads, "
             f"device {result['device']}{load}. Random weights (timing only).", ""]
    if result["table"]:
        lines += ["### Images per second", "",
                  "| model | mode | GFLOPs/img | " + " | ".join(f"B={b}" for b in result["batch_sizes"]) + " |",
                  "|---|---|---:|" + "---:|" * len(result["batch_sizes"])]
    by_model: dict[tuple[str, str], dict[int, dict]] = {}
    for row in result["table"]:
        by_model.setdefault((row["model"], row["mode"]), {})[row["batch"]] = row
    for (model, mode), cells in by_model.items():
        g = next(iter(cells.values()))["gflops_per_image"]
        rates = " | ".join(_fmt_rate(cells[b]["images_per_s"]) if b in cells else "" for b in result["batch_sizes"])
        lines.append(f"| {model} | {mode} | {g:.2f} | {rates} |")
    if result["ratio"]:
        lines += ["", "### LipSim-small (folded) / DreamSim ensemble, measured in alternation", "",
                  "| threads | batch | LipSim-small img/s | ensemble img/s | ratio (median of rounds) | rounds "
                  "| ratio of images per CPU-second |", "|---:|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {r['threads']} | {r['batch']} | {_fmt_rate(r['lipsim_small_images_per_s'])} | "
                  f"{_fmt_rate(r['ensemble_images_per_s'])} | **{r['ratio']:.2f}×** | "
                  f"{', '.join(f'{v:.1f}' for v in r['ratio_per_round'])} | {r['cpu_time_ratio']:.2f}× |"
                  for r in result["ratio"]]
    if result["steps"]:
        lines += ["", f"### LipSim-small step by step (batch {result['steps_batch']}, measured in alternation)", "",
                  "| step | threads | img/s | img per CPU-s | × previous | × reference | ratio to ensemble (same threads) "
                  "| max abs Δ vs reference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["steps"]:
            prev = f"{r['speedup_vs_previous']:.2f}×" if r.get("speedup_vs_previous") else ""
            ref = f"{r['speedup_vs_reference']:.2f}×" if "speedup_vs_reference" in r else ""
            diff = f"{r['max_abs_diff_vs_reference']:.1e}" if "max_abs_diff_vs_reference" in r else ""
            lines.append(f"| {r['step']} | {r['threads']} | {_fmt_rate(r['images_per_s'])} | "
                         f"{_fmt_rate(r['images_per_cpu_s'])} | {prev} | {ref} | "
                         f"{r['ratio_vs_ensemble_same_threads']:.2f}× | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from encoder.presets import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), help="LipSim presets (default: all)")
    ap.add_argument("--dreamsim", nargs="*", default=list(DREAMSIM_ARCHS), choices=DREAMSIM_ARCHS,
                    help="DreamSim architectures (default: all)")
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--ratio-batch-sizes", nargs="*", type=int, default=[1, 8, 16])
    ap.add_argument("--steps-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timing (at least one batch)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile steps to the step table")
    ap.add_argument("--quick", action="store_true", help="cpu presets, batch 1 and 4, no DreamSim, one round")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        if args.presets == list(PRESETS):
            args.presets = [p for p in PRESETS if p.startswith("cpu-")]
        args.dreamsim, args.batch_sizes, args.ratio_batch_sizes, args.rounds = [], [1, 4], [], 1
        args.min_time, args.steps_batch = 0.2, 0
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                         + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
              "batch_sizes": args.batch_sizes, "weights": "random", "command": " ".join(sys.argv),
              "table": [], "ratio": [], "steps": [], "steps_batch": args.steps_batch,
              "load_average_start": os.getloadavg()}
    if args.batch_sizes:
        print("# throughput table", flush=True)
        result["table"] = run_table(args.presets, args.dreamsim, args.batch_sizes, args.device, args.rounds,
                                    args.min_time)
    if args.ratio_batch_sizes and "small" in PRESETS:
        print("# LipSim-small / ensemble, alternating", flush=True)
        result["ratio"] = run_ratio(args.ratio_batch_sizes, args.device, args.rounds, args.min_time)
    if args.steps_batch:
        print("# LipSim-small step by step, alternating", flush=True)
        result["steps"] = run_steps(args.steps_batch, args.device, args.rounds, args.min_time, args.compile)
    result["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (args.out / "throughput.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'throughput.json'} and {args.out / 'throughput.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
