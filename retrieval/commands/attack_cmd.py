"""`robret attack IMAGE --index-dir DIR`: perturb a query image to change its top-k, and show what moved.

Untargeted (default): minimise the overlap with the clean top-k. Targeted (`--target FILE` or
`--target-rank N`): push one gallery item into the top-k. The perturbation is bounded in ℓ2 (or ℓ∞)
over the query image's own [0, 1] pixels; when the gallery's encoder has a Lipschitz bound the
certified radius of the clean top-k is printed next to it (an attack inside it cannot succeed).
The work is retrieval.attacks.attack_query; this module parses and prints. Exit status 1 if the
certificate was violated (never expected).
"""
from __future__ import annotations

import math
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("attack", help="attack a query's top-k (untargeted or targeted)",
                       description="Perturb IMAGE within an ℓ2/ℓ∞ ball so that its top-k in an indexed gallery "
                       "changes; print the clean and adversarial top-k, the perturbation norms and, for "
                       "certified encoders, the radius within which no attack can succeed.")
    p.add_argument("image", help="query image file")
    p.add_argument("--index-dir", required=True, help="index directory (see `robret index build`)")
    p.add_argument("-k", type=int, default=5, help="size of the top-k list (default 5)")
    p.add_argument("--norm", choices=("l2", "linf"), default="l2", help="threat model (default l2)")
    p.add_argument("--eps", type=float, default=0.5, help="radius in [0,1] pixel units (default 0.5; linf: e.g. 0.03)")
    p.add_argument("--steps", type=int, default=50, help="PGD steps (default 50)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--target", help="targeted: an indexed file to push into the top-k")
    tgt.add_argument("--target-rank", type=int, help="targeted: the item at this clean rank (1-based)")
    p.add_argument("--max-side", type=int, default=512,
                   help="shrink larger queries first (the attack then works on the shrunk image; default 512)")
    p.add_argument("--save", type=Path, help="write the adversarial image (PNG, rounded to 8 bits)")
    p.add_argument("--json", type=Path, help="write the outcome (top-k before/after, norms, certificate) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from tqdm.auto import tqdm

    from index.gallery import Gallery
    from retrieval.attacks import ImageEmbedder, PGDConfig, attack_query, query_image, rank_query

    with Gallery.open(args.index_dir, use_gpu=False) as gallery:
        ids = gallery.ids()
        if len(ids) <= args.k:
            raise ValueError(f"the gallery has {len(ids)} items: k must be smaller")
        query = query_image(gallery.decode(args.image).image, args.max_side)
        if query.note:
            print(query.note)
        target = None
        if args.target is not None:
            want = Path(args.target).resolve()
            match = [int(i) for i, p in zip(ids, gallery.paths(ids)) if p is not None and p.resolve() == want]
            if not match:
                raise ValueError(f"{args.target} is not in the index")
            target = match[0]
        targeted = target is not None or args.target_rank is not None
        emb = ImageEmbedder(gallery.encoder, layout=query.layout)
        with tqdm(total=args.steps, desc="attack", unit="step") as bar:
            def progress(step, total, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            out = attack_query(gallery, query.x, kind="targeted" if targeted else "untargeted",
                               config=PGDConfig(norm=args.norm, eps=args.eps, steps=args.steps), k=args.k,
                               target=target, target_rank=args.target_rank, embedder=emb, callback=progress)
        paths = {int(i): str(p) for i, p in zip(ids, gallery.paths(ids))}

        print(f"\nencoder {out.encoder}; query {query.x.shape[-1]}×{query.x.shape[-2]} px; "
              f"threat {args.norm} ε = {args.eps:g}; ε, ‖δ‖ and radii over {query.space}")
        if query.uncertified:
            print(f"note: no certificate holds for the file's own samples ({query.uncertified})")
        cert = out.certificate
        if cert is not None:
            r = cert.set_radius if args.norm == "l2" else cert.set_radius / math.sqrt(query.x.numel())
            verdict = "inside: the top-k cannot change" if args.eps < r else "outside: not guaranteed"
            print(f"certified top-{args.k} radius ({args.norm}): {r:.4f}  → ε is {verdict}")
        else:
            print("no Lipschitz bound: nothing is certified")

        def show(title, ranking):
            print(title)
            for rank, (i, s) in enumerate(zip(ranking.top, ranking.scores), 1):
                mark = "  *" if i == out.target else ""
                print(f"  {rank:>2}. {s:.4f}  {paths.get(i)}{mark}")

        show(f"\nclean top-{args.k}:", out.before)
        show(f"adversarial top-{args.k}:", out.after)
        print(f"\n‖δ‖₂ = {out.delta_l2:.4f}   ‖δ‖∞ = {out.delta_linf * 255:.2f}/255   "
              f"overlap with the clean top-{args.k}: {out.overlap * 100:.0f}%   "
              f"{'success' if out.success else 'no success'}")
        if cert is not None:
            print(f"certificate {cert.verdict}")
        report = out.to_dict(paths)
        if args.save:
            from encoder.image import pixels, to_pil

            saved = to_pil(out.x_adv, query.layout)  # the file's own mode: ‖δ‖ was measured over its samples
            saved.save(args.save)
            q8 = pixels(saved).samples[None]
            kept = rank_query(gallery, emb.embed(q8)[0].cpu().numpy(), args.k).top
            same = len(set(kept) & set(out.after.top))
            report["saved"] = {"path": str(args.save), "adversarial_topk_kept": same}
            print(f"saved {args.save} (8-bit rounding kept {same}/{args.k} of the adversarial top-{args.k})")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
            print(f"report written to {args.json}")
    return 0 if cert is None or cert.ok else 1
