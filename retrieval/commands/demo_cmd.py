"""`robret demo`: the main job on the bundled defaults, printed (what `make demo` runs).

1. Export the bundled sample photos to a folder and index it with LipSim (and with the comparison
   encoder: DreamSim when its weights are available, else the standard baseline, else raw pixels).
   Indexing is incremental, so a second run reuses the indexes.
2. Query with an edited copy of one photo (JPEG + brightness change): print each encoder's top-k,
   and for LipSim each result's certified radius and the top-k set's radius, in ℓ2 over the query
   image's own [0, 1] pixels.
3. Attack the query (untargeted top-k PGD, ℓ2) on both encoders: once inside LipSim's certified
   radius (LipSim's top-k may not change: that is the guarantee), and once at a larger ε.
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
    p.add_argument("--eps", type=float, default=2.0,
                   help="ℓ2 budget of the larger attack, in the query's [0,1] pixels (default 2.0)")
    p.add_argument("--steps", type=int, default=30, help="PGD steps per attack (default 30)")
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

    from encoder.preprocess import pil_to_tensor
    from encoder.samples import export_sample_photos
    from index import Gallery, IngestOptions, build_index
    from retrieval.attacks import PGDConfig, topk_untargeted
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
    if "random" in lip.encoder.name:
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
    set_radius = results["LipSim"].set_radius or 0.0
    budgets = [("inside LipSim's certificate", 0.95 * set_radius), ("larger budget", args.eps)]
    print(f"\nuntargeted top-{args.k} attack (PGD ℓ2, {args.steps} steps) on the query image:")
    print(f"   {'budget':<30} {'ε':>7}  {'encoder':<34} overlap@{args.k}  top-1 after")
    for label, eps in budgets:
        if eps <= 0:
            continue
        for role, g in galleries.items():
            ids, vecs = g.all_vectors()
            cfg = PGDConfig(norm="l2", eps=float(eps), steps=args.steps)
            torch.manual_seed(0)
            out = topk_untargeted(g.encoder, x, torch.from_numpy(np.asarray(vecs)), k=args.k, config=cfg)
            top1 = _names(g, ids[out.adv_topk[0, :1].numpy()])[0]
            print(f"   {label:<30} {eps:7.3f}  {g.encoder.name:<34} {out.overlap[0].item():8.0%}   {top1}")
            if role == "LipSim" and label.startswith("inside") and out.overlap[0].item() < 1.0:
                print("   !! LipSim's top-k changed inside its certified radius: certificate violated")
                return 1
    print("\nInside the certified radius LipSim's top-k cannot change; beyond it, compare how far each "
          "encoder's top-k moves for the same budget.")
    return 0
