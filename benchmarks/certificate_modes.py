"""How tight are certificates over the file's own samples, per image mode? (encoder/image.py)

For each channel layout (RGB, L, LA, RGBA, CMYK), a query is given in that layout's samples and
attacked with ℓ2 PGD *in those samples* (through the same float conversion and resize the query path
uses). We report the smallest multiple of the certified set radius at which the attack first changes the
top-k, for two statements of the radius:

    after   r_enc / (c·‖R‖₂)   the radius robret states now (c = the layout's channel factor)
    before  r_enc / ‖R‖₂       the first landing's radius, which ignored the channel conversion

A multiple below 1 is a broken certificate. Two settings:
    tight   the `pixels` encoder at 8 px on small dark images, near-duplicate galleries in the same layout
            (the bound is nearly attained: RGB first falls just above 1×);
    demo    `lipsim:demo` on the bundled photos (64 px queries, gallery: the other photos and
            near-duplicates of the query).

    python -m benchmarks.certificate_modes [--quick] [--out benchmarks/results/certificate_modes]

Writes JSON and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from encoder import load_encoder
from encoder.certify import certify_topk, slack_for
from encoder.image import LAYOUT_CHANNELS, channel_lipschitz, to_rgb
from encoder.preprocess import input_norm, resize, resize_operator_norm, samples_to_input
from encoder.attack import PGDConfig, pgd

LAYOUTS = ("RGB", "L", "LA", "RGBA", "CMYK")
MULTIPLES = (0.25, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0, 4.0,
             6.0, 8.0)


def rgb_to_layout(rgb: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """Samples in `layout` whose conversion is (close to) `rgb` (3, H, W): a file of that mode showing the photo."""
    if layout == "RGB":
        return rgb
    grey = rgb.mean(0, keepdim=True)
    if layout == "L":
        return grey
    alpha = 1 - 0.05 * torch.rand(1, *rgb.shape[1:], generator=gen)
    if layout == "LA":  # composite on white: 1 − a(1 − g) = grey  ⇒  g = 1 − (1 − grey)/a
        return torch.cat([(1 - (1 - grey) / alpha).clamp(0, 1), alpha])
    if layout == "RGBA":
        return torch.cat([(1 - (1 - rgb) / alpha).clamp(0, 1), alpha])
    k = 1 - rgb.max(0, keepdim=True).values  # (1 − u)(1 − k) = rgb with the usual naive CMYK split
    u = 1 - rgb / (1 - k).clamp_min(1e-6)
    return torch.cat([u.clamp(0, 1), k])


def first_break(encoder, samples, layout, gallery, top, radius, steps, restarts, seed=0) -> float:
    """Smallest multiple m of `radius` (from MULTIPLES) at which ℓ2 PGD in the samples changes the top-k."""
    size = encoder.input_size
    outside = torch.tensor([j for j in range(gallery.shape[0]) if j not in set(top.tolist())])

    def objective(x):  # < 0 once an outsider beats the weakest top-k item
        s = encoder.embed(samples_to_input(x, layout, size)) @ gallery.T
        return s[:, top].min(1).values - s[:, outside].max(1).values

    for m in MULTIPLES:
        cfg = PGDConfig(norm="l2", eps=float(radius * m), steps=steps, restarts=restarts, random_start=True)
        out = pgd(samples[None], objective, cfg, generator=torch.Generator().manual_seed(seed))
        if float(out.loss[0]) < 0:
            return m
    return math.inf


def tight_cases(layout: str, n: int, side: int = 8):
    enc = load_encoder(f"pixels:{side}")
    gen = torch.Generator().manual_seed(0)
    c = LAYOUT_CHANNELS[layout]
    for _ in range(n):
        # dark (‖f‖ = ‖[x, 1]‖ ≈ 1, so the pixels encoder's normalisation is nearly an isometry), with room
        # below and above every sample for the attack
        samples = 0.02 + torch.rand(c, side, side, generator=gen) * 0.04
        if layout in ("LA", "RGBA"):
            samples[-1] = 0.97 - samples[-1] * 0.3  # nearly opaque: the alpha factor is attained at a = 1
        if layout == "CMYK":
            samples[3] = 0.97 - samples[3] * 0.3  # mostly key: dark
        scale = torch.full((c, 1, 1), 0.004)
        if layout == "RGBA":
            scale[:3] = 0.001
        near = samples + scale * torch.randn(6, c, side, side, generator=gen)
        near[0] = samples + 0.3 * (near[0] - samples)  # a clear nearest item: margins well above float noise
        near = near.clamp(0, 1)
        with torch.no_grad():
            gallery = enc.embed(to_rgb(near, layout))
        yield enc, samples, gallery


def demo_cases(layout: str, n: int, side: int = 64):
    from encoder.samples import HELDOUT_PHOTOS, sample_photo
    from encoder.preprocess import pil_to_tensor

    enc = load_encoder("lipsim:demo")
    gen = torch.Generator().manual_seed(1)
    photos = [resize(pil_to_tensor(sample_photo(name)), side).clamp(0, 1) for name in HELDOUT_PHOTOS]
    with torch.no_grad():
        base = enc.embed(torch.stack(photos))
    for i in range(n):
        q = photos[i % len(photos)]
        near = (q + 0.03 * torch.randn(4, 3, side, side, generator=gen)).clamp(0, 1)
        with torch.no_grad():
            gallery = torch.cat([base, enc.embed(near)])
        yield enc, rgb_to_layout(q, layout, gen), gallery


def measure(setting: str, n: int, k: int, steps: int, restarts: int) -> list[dict]:
    rows = []
    for layout in LAYOUTS:
        factor = channel_lipschitz(layout)
        cases = tight_cases(layout, n) if setting == "tight" else demo_cases(layout, n)
        for case, (enc, samples, gallery) in enumerate(cases):
            size = enc.input_size
            hw = tuple(samples.shape[-2:])
            with torch.no_grad():
                e_q = enc.embed(samples_to_input(samples[None], layout, size))[0]
            cert = certify_topk(e_q.numpy(), gallery.numpy(), k, enc.lipschitz, slack=slack_for(enc.float_error))
            if cert.set_radius <= 0:
                continue
            after = cert.set_radius / input_norm(hw, size, layout)
            before = cert.set_radius / resize_operator_norm(hw, (size, size))
            m = first_break(enc, samples, layout, gallery, torch.as_tensor(cert.positions), after, steps, restarts)
            rows.append({"setting": setting, "layout": layout, "factor": factor, "case": case,
                         "radius_after": after, "radius_before": before, "break_x_after": m,
                         "break_x_before": m * after / before})
            print(f"{setting:5} {layout:4} case {case}: breaks at {m:g}× the stated radius "
                  f"({m * after / before:.3g}× the first landing's)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | layout | channel factor | cases | first break, × stated radius (min / median) | "
             "× the first landing's radius (min) | broken now |", "|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for layout in LAYOUTS:
            rs = [r for r in rows if r["setting"] == setting and r["layout"] == layout]
            if not rs:
                continue
            after = np.array([r["break_x_after"] for r in rs])
            before = np.array([r["break_x_before"] for r in rs])
            lines.append(f"| {setting} | {layout} | {rs[0]['factor']:.4f} | {len(rs)} | {after.min():.3g} / "
                         f"{np.median(after):.3g} | {before.min():.3g} | {int((after < 1).sum())} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one case per layout, tight setting only, short attacks")
    p.add_argument("--cases", type=int, default=4, help="queries per layout and setting (default 4)")
    p.add_argument("-k", type=int, default=1, help="top-k size (default 1)")
    p.add_argument("--settings", nargs="+", choices=("tight", "demo"), default=("tight", "demo"),
                   help="which settings to run (default both; demo is the slow one)")
    p.add_argument("--out", default="benchmarks/results/certificate_modes", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = ["tight"] if args.quick else list(args.settings)
    n, steps, restarts = (1, 20, 1) if args.quick else (args.cases, 50, 3)
    rows = [r for s in settings for r in measure(s, n, args.k, steps, restarts)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"k": args.k, "rows": rows}, indent=1))
    table = markdown(rows)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
