"""Load time of an official-format LipSim checkpoint: from the official .pth vs from the converted cache.

    python -m benchmarks.weights_load [--preset small] [--repeats 3] [--json FILE]

Writes a random-weight checkpoint of `--preset`'s shape (default: small, the official checkpoints'
63.3M-parameter shape) in the official trainer's format (torch.save dict, `model_state_dict` with
`module.model.` keys, the tensors repeated under `base.1.` / `base.2.`), installs it as
lipsim:official-m0.5 in a temporary weights cache with `robret weights import`'s code (converted once
to safetensors), then times, alternately and `--repeats` times each, the two loads a user sees:
    before  load_encoder("lipsim:FILE.pth")          torch.load(weights_only) + conversion + build
    after   load_encoder("lipsim:official-m0.5")     safetensors header + tensors + build
and checks that both give the same embedding. Prints a Markdown table (medians), optionally JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def official_state_dict(net) -> dict:
    """A robret LipSimNet's tensors under the official layout's keys (both copies, as the trainer saves them)."""
    out = {}
    for i, layer in enumerate(net.convs):
        for name in ("kernel", "bias", "q"):
            t = getattr(layer, name).detach().clone()
            out[f"module.model.convs.{i}.{name}"] = t
            out[f"module.model.base.1.{i}.{name}"] = t
    for j, layer in enumerate(net.linear, start=1):  # index 0 is the official Flatten
        for name in ("weight", "bias", "q"):
            t = getattr(layer, name).detach().clone()
            out[f"module.model.linear.{j}.{name}"] = t
            out[f"module.model.base.2.{j}.{name}"] = t
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["small", "medium", "large", "xlarge"],
                   help="official LipSim shape of the synthesised checkpoint (D = 1792 needs one of these)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="", help="also write the results as JSON to this file")
    args = p.parse_args(argv)

    import torch

    from encoder import PRESETS, LipSimEncoder, load_encoder
    from encoder.fetch import import_weights

    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(prefix="robret-weights-bench-") as tmp:
        tmp = Path(tmp)
        pth = tmp / "lipsim-official-m0.5.pth"
        net = LipSimEncoder(cfg).net
        torch.save({"model_state_dict": official_state_dict(net), "epoch": 1}, pth)
        cache = tmp / "cache"
        t0 = time.perf_counter()
        safetensors = import_weights("lipsim:official-m0.5", pth, cache_dir=cache)
        convert_s = time.perf_counter() - t0
        loads = {"before": [], "after": []}
        encoders = {}
        for _ in range(args.repeats):
            for key, spec, kwargs in (("before", f"lipsim:{pth}", {}),
                                      ("after", "lipsim:official-m0.5", {"weights_dir": cache})):
                t = time.perf_counter()
                encoders[key] = load_encoder(spec, **kwargs)
                loads[key].append(time.perf_counter() - t)
        x = torch.rand(1, 3, cfg.input_size, cfg.input_size)
        with torch.no_grad():
            diff = (encoders["before"].embed(x) - encoders["after"].embed(x)).abs().max().item()
        result = {
            "preset": args.preset, "parameters": cfg.num_params(), "repeats": args.repeats,
            "pth_bytes": pth.stat().st_size, "safetensors_bytes": safetensors.stat().st_size,
            "convert_once_s": convert_s, "load_pth_s": statistics.median(loads["before"]),
            "load_safetensors_s": statistics.median(loads["after"]), "all_s": loads,
            "max_abs_embedding_difference": diff, "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        }
    print(f"LipSim {args.preset} ({cfg.num_params() / 1e6:.1f}M parameters), median of {args.repeats} loads, "
          f"{result['torch_threads']} torch threads")
    print("| load | file | wall time |")
    print("| --- | --- | --- |")
    print(f"| before: official .pth (torch.load + convert) | {result['pth_bytes'] / 1e6:.0f} MB | "
          f"{result['load_pth_s']:.2f} s |")
    print(f"| after: cached safetensors (lipsim:official-m0.5) | {result['safetensors_bytes'] / 1e6:.0f} MB | "
          f"{result['load_safetensors_s']:.2f} s |")
    print(f"| (once) fetch/import: check + convert + write | | {result['convert_once_s']:.2f} s |")
    print(f"max |Δ embedding| between the two: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
