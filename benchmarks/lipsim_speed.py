"""LipSim preset speed on this machine: images/s in training mode and in inference mode, per preset.

RANDOM WEIGHTS (speed does not depend on the values). Every mode of every preset is measured once
per round, in alternation (so that load from other processes hits every mode alike); the median
over rounds is reported:
  train            forward + backward of a scalar loss, parameters trainable (unfolded: T⁻¹ from the
                   Gram every step, as in training)
  infer-unfolded   no_grad forward in eval mode, T⁻¹ recomputed on every call (the training form)
  infer-folded     no_grad forward after freeze(): T⁻¹ folded into the weights once, plus whatever
                   inference kernels LipSimNet uses when frozen
  infer-folded-layers  (when encoder.lipsim has such kernels) the same folded weights run layer by
                   layer, to separate what folding buys from what the kernels buy
and the inference-mode speed-up folded / unfolded, measured side by side.

    python -m benchmarks.lipsim_speed                          # CPU presets (~1–2 min on 2 cores)
    python -m benchmarks.lipsim_speed --presets small medium   # official shapes at 224 px (slow)
    python -m benchmarks.lipsim_speed --info                   # also time `robret encoder info` per preset
Writes JSON (default benchmarks/results/lipsim_speed.json) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lipsim_speed.json"
CPU_PRESETS = ("cpu-tiny", "cpu-small", "cpu-base", "cpu-large")
MODES = ("train", "infer-unfolded", "infer-folded", "infer-folded-layers")


def _timed(fn, min_seconds: float) -> float:
    """Seconds per call: one warm-up call, then calls until min_seconds have passed (at least 2)."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if n >= 2 and elapsed >= min_seconds:
            return elapsed / n


@contextlib.contextmanager
def _layer_by_layer():
    """Disable LipSimNet's frozen-inference kernels, if it has any (see encoder/lipsim.py)."""
    import encoder.lipsim as lipsim_module

    if hasattr(lipsim_module, "can_use_fast_path"):
        with mock.patch.object(lipsim_module, "can_use_fast_path", lambda *a, **k: False):
            yield True
    else:
        yield False


class PresetBench:
    """One preset's network and inputs; `round()` measures every mode once, in alternation."""

    def __init__(self, name: str, train_batch: int, infer_batch: int, min_seconds: float, seed: int = 0):
        from encoder import LipSimNet, get_preset

        self.name, self.config = name, get_preset(name)
        self.train_batch, self.infer_batch, self.min_seconds = train_batch, infer_batch, min_seconds
        torch.manual_seed(seed)
        self.net = LipSimNet(self.config)
        s = self.config.input_size
        self.x_train = torch.rand(train_batch, 3, s, s)
        self.x_infer = torch.rand(infer_batch, 3, s, s)
        self.per_mode: dict[str, list[float]] = {m: [] for m in MODES}
        self.max_abs: dict[str, float] = {}

    def _train_step(self):
        self.net.zero_grad(set_to_none=True)
        self.net(self.x_train).sum().backward()

    def _infer(self):
        with torch.no_grad():
            return self.net(self.x_infer)

    def round(self) -> None:
        net, pm = self.net, self.per_mode
        net.unfreeze()
        net.train()
        pm["train"].append(self.train_batch / _timed(self._train_step, self.min_seconds))
        net.eval()
        net.requires_grad_(False)
        pm["infer-unfolded"].append(self.infer_batch / _timed(self._infer, self.min_seconds))
        reference = self._infer()
        net.freeze()
        pm["infer-folded"].append(self.infer_batch / _timed(self._infer, self.min_seconds))
        self.max_abs["infer-folded"] = (self._infer() - reference).abs().max().item()
        with _layer_by_layer() as patched:
            if patched:
                pm["infer-folded-layers"].append(self.infer_batch / _timed(self._infer, self.min_seconds))
                self.max_abs["infer-folded-layers"] = (self._infer() - reference).abs().max().item()

    def result(self) -> dict:
        pm = {m: v for m, v in self.per_mode.items() if v}
        out = {
            "preset": self.name, "input_size": self.config.input_size, "parameters": self.config.num_params(),
            "dim": self.config.out_dim, "train_batch": self.train_batch, "infer_batch": self.infer_batch,
            "images_per_s": {m: statistics.median(v) for m, v in pm.items()},
            "rounds": pm, "max_abs_diff_vs_unfolded": self.max_abs,
            # ratios per round (the two measured back to back), then the median
            "speedup_folded_vs_unfolded": statistics.median(
                f / u for f, u in zip(pm["infer-folded"], pm["infer-unfolded"])),
        }
        if "infer-folded-layers" in pm:
            out["speedup_folded_layers_vs_unfolded"] = statistics.median(
                f / u for f, u in zip(pm["infer-folded-layers"], pm["infer-unfolded"]))
        return out


def time_encoder_info(preset: str) -> dict:
    """Wall time and output of `robret encoder info lipsim:<preset>` (in-process)."""
    from retrieval.cli import main

    buf = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        status = main(["encoder", "info", f"lipsim:{preset}"])
    return {"preset": preset, "status": status, "seconds": time.perf_counter() - start, "output": buf.getvalue()}


def markdown(results: list[dict], info: list[dict], meta: dict) -> str:
    lines = [
        f"LipSim preset speed — RANDOM WEIGHTS — {meta['cpu']}, {meta['threads']} torch threads, "
        f"torch {meta['torch']}, median of {meta['rounds']} alternating rounds",
        "",
        "| preset | input | params | train img/s (batch) | infer unfolded img/s | infer folded img/s "
        "| folded, layer by layer img/s | speed-up folded/unfolded | max abs Δ folded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ips = r["images_per_s"]
        layers = f"{ips['infer-folded-layers']:.1f}" if "infer-folded-layers" in ips else "—"
        lines.append(
            f"| {r['preset']} | {r['input_size']} | {r['parameters'] / 1e6:.2f}M | {ips['train']:.1f} "
            f"({r['train_batch']}) | {ips['infer-unfolded']:.1f} | {ips['infer-folded']:.1f} "
            f"(batch {r['infer_batch']}) | {layers} | {r['speedup_folded_vs_unfolded']:.2f}× "
            f"| {r['max_abs_diff_vs_unfolded']['infer-folded']:.1e} |")
    if info:
        lines += ["", "| `robret encoder info lipsim:…` | seconds | exit |", "|---|---|---|"]
        lines += [f"| {i['preset']} | {i['seconds']:.1f} | {i['status']} |" for i in info]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(CPU_PRESETS), help="presets to time (default: cpu-*)")
    parser.add_argument("--train-batch", type=int, default=32, help="batch size in training mode (default 32)")
    parser.add_argument("--infer-batch", type=int, default=32, help="batch size in inference mode (default 32)")
    parser.add_argument("--official-batch", type=int, default=2,
                        help="batch size for both modes for the official 224 px presets (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--info", action="store_true", help="also time `robret encoder info` for every preset")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    from encoder import list_presets

    torch.set_num_threads(args.threads)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
            "rounds": args.rounds, "weights": "random", "command": "python -m benchmarks.lipsim_speed "
            + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    benches = []
    for name in args.presets:
        official = not name.startswith("cpu-")
        tb, ib = (args.official_batch, args.official_batch) if official else (args.train_batch, args.infer_batch)
        benches.append(PresetBench(name, tb, ib, args.min_seconds))
    # Rounds go over every preset in turn, so that a busy spell on a shared CPU hits all of them.
    for r in range(args.rounds):
        for bench in benches:
            bench.round()
            print(f"round {r + 1} {bench.name}: "
                  + ", ".join(f"{m} {v[-1]:.1f}" for m, v in bench.per_mode.items() if v), flush=True)
    results = [bench.result() for bench in benches]
    info = [time_encoder_info(p) for p in list_presets()] if args.info else []
    table = markdown(results, info, meta)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results, "encoder_info": info, "markdown": table},
                                   indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
