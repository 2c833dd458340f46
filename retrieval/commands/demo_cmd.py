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

Encoders come from encoder.choose (the UI's chooser); each attack is retrieval.attacks.attack_query.
Exit status 1 if a certificate was violated (never expected).
"""
from __future__ import annotations

import io
from pathlib import Path

from ._argtypes import UsageError, nonnegative_float, positive_int

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
    p.add_argument("-k", type=positive_int, default=5, help="top-k (default 5)")
    p.add_argument("--eps", type=nonnegative_float, default=60.0,
                   help="ℓ2 budget of the larger attack over the query's [0,1] pixels (default 60: "
                   "rms 17/255 per pixel on the 512×512 query)")
    p.add_argument("--steps", type=positive_int, default=40, help="PGD steps per attack (default 40)")
    p.add_argument("--target", default="gravel", help="photo the attack tries to bring first (default gravel)")
    p.add_argument("--query", default="astronaut", help="sample photo to edit into the query (default astronaut)")
    p.add_argument("--json", type=Path, help="write the searches and attack outcomes as JSON")
    p.set_defaults(func=run)


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
    import json

    if args.json is not None and not args.json.parent.is_dir():  # (said now, not after the attacks)
        raise UsageError(f"--json {args.json}: no folder {args.json.parent} to write it in")

    from encoder import load_encoder
    from encoder.choose import choose_comparison, default_lipsim_spec
    from encoder.samples import export_sample_photos
    from index import Gallery, IngestOptions, build_cache_index
    from retrieval.attacks import PGDConfig, attack_query, query_image
    from retrieval.search import search_image

    work = args.dir
    photos = work / "photos"
    export_sample_photos(photos)
    lip_spec = default_lipsim_spec(args.encoder)
    compare = choose_comparison(args.compare)
    for note in compare.notes:
        print(f"NOTE: {note}")
    encoders = {"LipSim": (lip_spec, load_encoder(lip_spec)), "comparison": (compare.spec, compare.encoder)}
    galleries = {}
    for role, (spec, enc) in encoders.items():
        index_dir = work / ("index-" + spec.replace(":", "-").replace("/", "_"))
        report = build_cache_index(photos, index_dir, spec, encoder=enc, options=IngestOptions(progress=True))
        galleries[role] = Gallery.open(index_dir, encoder=enc)
        print(f"[{role}] {spec}: {report.total} photos indexed in {index_dir} "
              f"({report.embedded} embedded now, {report.unchanged} unchanged)")
    lip = galleries["LipSim"]
    if not lip.encoder.pretrained:
        print("  NOTE: no bundled lipsim:demo model: random weights — radii are real, quality is not.")
    record: dict = {"encoders": {role: spec for role, (spec, _) in encoders.items()}, "query": args.query,
                    "target": args.target, "searches": {}, "attacks": []}

    query = _edited_query(args.query)
    print(f"\nquery: '{args.query}' JPEG q60, 10% darker, {query.width}×{query.height} px")
    for role, g in galleries.items():
        res = search_image(g, query, k=args.k)
        record["searches"][role] = res.to_dict()
        print(f"\n[{role}] {g.encoder.name} top-{args.k}" +
              (f" (L = {res.lipschitz}, radii: {res.radius_space})" if res.set_radius is not None
               else " (no Lipschitz bound: no certificate)"))
        for h in res.hits:
            radius = f"  certified ‖δ‖ < {h.radius:.3f}" if h.radius is not None else ""
            print(f"   {h.rank}. {Path(h.path).stem:<22} score {h.score:.4f}{radius}")
        if res.set_radius is not None:
            print(f"   top-{args.k} set certified for ‖δ‖₂ < {res.set_radius:.4f}")

    q = query_image(query)
    x = q.x
    top1_radius = search_image(lip, query, k=1).set_radius or 0.0
    budgets = [("inside LipSim's top-1 certificate", 0.95 * top1_radius), ("larger budget", args.eps)]
    n_values = x.numel()
    print(f"\ntargeted attack (PGD ℓ2, {args.steps} steps): make '{args.target}' the top-1 answer")
    print(f"   LipSim's top-1 is certified for ‖δ‖₂ < {top1_radius:.3f} over the query's {n_values:,} values")
    print(f"   {'budget':<34} {'ε':>7} {'rms/px':>7}  {'encoder':<16} top-1 after       target score")
    violated = False
    for label, eps in budgets:
        if eps <= 0:
            continue
        for role, g in galleries.items():
            ids = g.ids()
            names = dict(zip(ids.tolist(), _names(g, ids)))
            target = [i for i, n in names.items() if n == args.target]
            if not target:
                raise ValueError(f"--target {args.target!r} is not in the gallery ({', '.join(names.values())})")
            out = attack_query(g, x, kind="targeted", config=PGDConfig(norm="l2", eps=float(eps), steps=args.steps),
                               k=1, target=target[0], depth=len(g), layout=q.layout)
            record["attacks"].append({"budget": label, "eps": float(eps), "role": role, **out.to_dict(names)})
            s_before, s_after = out.target_score
            rms = eps / n_values ** 0.5 * 255
            print(f"   {label:<34} {eps:7.3f} {rms:5.1f}/255  {g.encoder.name:<16} {names[out.after.top[0]]:<17} "
                  f"{s_before:.3f} → {s_after:.3f}{'  (attack succeeded)' if out.success else ''}")
            if out.certificate is not None and not out.certificate.ok:
                print(f"   !! {g.encoder.name}: certificate {out.certificate.verdict}")
                violated = True
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
        print(f"\nreport written to {args.json}")
    if violated:
        return 1
    print("\nInside its certified radius LipSim's answer cannot change, whatever the attack; beyond it, "
          "compare how far the same budget moves each encoder.")
    return 0
