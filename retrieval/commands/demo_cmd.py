"""`robret demo`: the main job on the bundled defaults, printed (what `make demo` runs).

1. Export the bundled sample photos to a folder and index it with LipSim (and with the comparison
   encoder: DreamSim when its weights are available, else the standard baseline, else raw pixels).
   Indexing is incremental, so a second run reuses the indexes.
2. Query with an edited copy of one photo (JPEG + brightness change): print each encoder's top-k,
   and for LipSim each result's certified radius and the top-k set's radius, in ℓ2 over the query
   image's own [0, 1] pixels.
3. Attack the query on both encoders (targeted PGD, ℓ2: make another photo come first): once
   inside LipSim's certified top-1 radius (LipSim's answer may not change: that is the guarantee),
   and once at a larger ε, where the non-robust encoder typically gives way first.
"""
from __future__ import annotations

import io
from pathlib import Path

DEFAULT_DIR = Path(".robret-demo")


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="index the sample photos, query, certify, attack, print",
        description="The end-to-end job on bundled defaults: index scikit-image's sample photos with "
        "LipSim and a comparison encoder, query with an edited photo, print certified radii, then attack "
        "the query on both encoders and show how each top-k changes.")
    p.add_argument("--encoder", default=None,
                   help="LipSim spec (default lipsim:demo; lipsim:cpu-small with random weights if absent)")
    p.add_argument("--compare", default=None,
                   help="comparison spec (default: dreamsim:ensemble if its weights exist, else standard:demo, "
                   "else pixels)")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"work folder (default {DEFAULT_DIR})")
    p.add_argument("-k", type=int, default=5, help="top-k (default 5)")
    p.add_argument("--eps", type=float, default=60.0,
                   help="ℓ2 budget of the larger attack over the query's [0,1] pixels (default 60: "
                   "rms 17/255 per pixel on the 512×512 query)")
    p.add_argument("--steps", type=int, default=40, help="PGD steps per attack (default 40)")
    p.add_argument("--target", default="gravel", help="photo the attack tries to bring first (default gravel)")
    p.add_argument("--query", default="astronaut", help="sample photo to edit into the query (default astronaut)")
    p.set_defaults(func=run)


def _lipsim_spec(spec: str | None) -> str:
    from encoder.registry import bundled_weights

    if spec:
        return spec
    return "lipsim:demo" if "demo" in bundled_weights("lipsim") else "lipsim:cpu-small"


def _compare_spec(spec: str | None) -> str:
    if spec:
        return spec
    from encoder.registry import bundled_weights

    try:
        from encoder.dreamsim_backend import weights_available

        if weights_available("ensemble"):
            return "dreamsim:ensemble"
    except ImportError:
        pass
    return "standard:demo" if "demo" in bundled_weights("standard") else "pixels"


def _edited_query(name: str):
    """The sample photo `name`, JPEG-compressed (quality 60) and 10% darker: a realistic near-duplicate."""
    from PIL import Image, ImageEnhance

    from encoder.samples import sample_photo

    buf = io.BytesIO()
    ImageEnhance.Brightness(sample_photo(name).convert("RGB")).enhance(0.9).save(buf, "JPEG", quality=60)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _names(gallery, ids) -> list[str]:
    return [p.stem if p is not None else "-" for p in gallery.paths(ids)]


def run(args) -> int:
    import numpy as np
    import torch

    from encoder.preprocess import pil_to_tensor, resize
    from encoder.samples import export_sample_photos
    from index import Gallery, IngestOptions, build_index
    from retrieval.attacks import PGDConfig, topk_targeted
    from retrieval.search import search_image

    work = args.dir
    photos = work / "photos"
    export_sample_photos(photos)
    specs = {"LipSim": _lipsim_spec(args.encoder), "comparison": _compare_spec(args.compare)}
    galleries = {}
    for role, spec in specs.items():
        index_dir = work / ("index-" + spec.replace(":", "-").replace("/", "_"))
        report = build_index(photos, index_dir, spec, options=IngestOptions(progress=True))
        galleries[role] = Gallery.open(index_dir)
        print(f"[{role}] {spec}: {report.total} photos indexed in {index_dir} "
              f"({report.embedded} embedded now, {report.unchanged} unchanged)")
    lip = galleries["LipSim"]
    if not lip.encoder.pretrained:
        print("  NOTE: no bundled lipsim:demo model: random weights — radii are real, quality is not.")

    query = _edited_query(args.query)
    print(f"\nquery: '{args.query}' JPEG q60, 10% darker, {query.width}×{query.height} px")
    results = {}
    for role, g in galleries.items():
        res = search_image(g, query, k=args.k)
        results[role] = res
        print(f"\n[{role}] {g.encoder.name} top-{args.k}" +
              (f" (L = {res.lipschitz}, radii: ℓ2 over the query's pixels)" if res.set_radius is not None
               else " (no Lipschitz bound: no certificate)"))
        for h in res.hits:
            radius = f"  certified ‖δ‖ < {h.radius:.3f}" if h.radius is not None else ""
            print(f"   {h.rank}. {Path(h.path).stem:<22} score {h.score:.4f}{radius}")
        if res.set_radius is not None:
            print(f"   top-{args.k} set certified for ‖δ‖₂ < {res.set_radius:.4f}")

    x = pil_to_tensor(query)[None]
    top1_radius = search_image(lip, query, k=1).set_radius or 0.0
    budgets = [("inside LipSim's top-1 certificate", 0.95 * top1_radius), ("larger budget", args.eps)]
    n_values = x.numel()
    print(f"\ntargeted attack (PGD ℓ2, {args.steps} steps): make '{args.target}' the top-1 answer")
    print(f"   LipSim's top-1 is certified for ‖δ‖₂ < {top1_radius:.3f} over the query's {n_values:,} values")
    print(f"   {'budget':<34} {'ε':>7} {'rms/px':>7}  {'encoder':<16} top-1 after       target score")
    for label, eps in budgets:
        if eps <= 0:
            continue
        for role, g in galleries.items():
            ids, vecs = g.all_vectors()
            names = _names(g, ids)
            if args.target not in names:
                raise ValueError(f"--target {args.target!r} is not in the gallery ({', '.join(names)})")
            target = names.index(args.target)
            gal = torch.from_numpy(np.asarray(vecs))
            out = topk_targeted(g.encoder, x, gal, target, k=1,
                                config=PGDConfig(norm="l2", eps=float(eps), steps=args.steps))
            with torch.no_grad():
                s_before = float(g.embed_images([query])[0] @ vecs[target])
                s_after = float(g.encoder.embed(resize(out.x_adv, g.encoder.input_size))[0] @ gal[target])
            top1 = names[int(out.adv_topk[0, 0])]
            rms = eps / n_values ** 0.5 * 255
            print(f"   {label:<34} {eps:7.3f} {rms:5.1f}/255  {g.encoder.name:<16} {top1:<17} "
                  f"{s_before:.3f} → {s_after:.3f}{'  (attack succeeded)' if bool(out.success[0]) else ''}")
            if role == "LipSim" and label.startswith("inside") and bool(out.success[0]):
                print("   !! LipSim's top-1 changed inside its certified radius: certificate violated")
                return 1
    print("\nInside its certified radius LipSim's answer cannot change, whatever the attack; beyond it, "
          "compare how far the same budget moves each encoder.")
    return 0
