"""`robret attack IMAGE --index-dir DIR`: perturb a query image to change its top-k, and show what moved.

Untargeted (default): minimise the overlap with the clean top-k. Targeted (`--target FILE` or
`--target-rank N`): push one gallery item into the top-k. The perturbation is bounded in ℓ2 (or ℓ∞)
over the query image's own [0, 1] pixels; when the gallery's encoder has a Lipschitz bound the
certified radius of the clean top-k is printed next to it (an attack inside it cannot succeed).
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
    p.set_defaults(func=run)


def _load_query(gallery, path: str, max_side: int):
    from encoder.preprocess import pil_to_tensor, resize

    x = pil_to_tensor(gallery.decode(path).image)
    h, w = x.shape[-2:]
    note = None
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        x = resize(x, (max(1, round(h * f)), max(1, round(w * f))))
        note = f"query shrunk from {w}×{h} to {x.shape[-1]}×{x.shape[-2]} px before attacking"
    return x.clamp(0, 1)[None], note


def run(args) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from encoder.certify import certify_topk
    from index.gallery import Gallery
    from retrieval.attacks import ImageEmbedder, PGDConfig, topk_targeted, topk_untargeted

    with Gallery.open(args.index_dir, use_gpu=False) as gallery:
        ids, vectors = gallery.all_vectors()
        if len(ids) <= args.k:
            raise ValueError(f"the gallery has {len(ids)} items: k must be smaller")
        emb = ImageEmbedder(gallery.encoder)
        g = torch.from_numpy(np.ascontiguousarray(vectors))
        x, note = _load_query(gallery, args.image, args.max_side)
        if note:
            print(note)
        e0 = emb.embed(x)
        order = (e0 @ g.T)[0].argsort(descending=True)
        target = None
        if args.target_rank is not None:
            if not 1 <= args.target_rank <= len(ids):
                raise ValueError(f"--target-rank must be in 1..{len(ids)}")
            target = int(order[args.target_rank - 1])
        elif args.target is not None:
            want = Path(args.target).resolve()
            paths = gallery.paths(ids)
            match = [i for i, p in enumerate(paths) if p is not None and p.resolve() == want]
            if not match:
                raise ValueError(f"{args.target} is not in the index")
            target = match[0]

        config = PGDConfig(norm=args.norm, eps=args.eps, steps=args.steps)
        with tqdm(total=args.steps, desc="attack", unit="step") as bar:
            def progress(step, total, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            if target is None:
                res = topk_untargeted(emb, x, g, k=args.k, config=config, callback=progress)
            else:
                res = topk_targeted(emb, x, g, target, k=args.k, config=config, callback=progress)
        x_adv = res.x_adv

        lip = emb.image_lipschitz(tuple(x.shape[-2:]))
        print(f"\nencoder {emb.name}; query {x.shape[-1]}×{x.shape[-2]} px; threat {args.norm} ε = {args.eps:g}")
        if lip is not None:
            cert = certify_topk(e0[0].double().numpy(), g.double().numpy(), args.k, lip)
            r = cert.set_radius if args.norm == "l2" else cert.set_radius / math.sqrt(x[0].numel())
            verdict = "inside: the top-k cannot change" if args.eps < r else "outside: not guaranteed"
            print(f"certified top-{args.k} radius ({args.norm}): {r:.4f}  → ε is {verdict}")
        else:
            print("no Lipschitz bound: nothing is certified")
        paths = gallery.paths(ids)

        def show(title, idx, e):
            s = (e @ g.T)[0]
            print(title)
            for rank, i in enumerate(idx.tolist(), 1):
                mark = "  *" if target is not None and i == target else ""
                print(f"  {rank:>2}. {s[i].item():.4f}  {paths[i]}{mark}")

        show(f"\nclean top-{args.k}:", res.clean_topk[0], e0)
        show(f"adversarial top-{args.k}:", res.adv_topk[0], emb.embed(x_adv))
        print(f"\n‖δ‖₂ = {res.l2.item():.4f}   ‖δ‖∞ = {res.linf.item() * 255:.2f}/255   "
              f"overlap with the clean top-{args.k}: {res.overlap.item() * 100:.0f}%   "
              f"{'success' if bool(res.success[0]) else 'no success'}")
        if args.save:
            from PIL import Image

            arr = (x_adv[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(args.save)
            q8 = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
            kept = (emb.embed(q8) @ g.T).topk(args.k).indices[0]
            same = len(set(kept.tolist()) & set(res.adv_topk[0].tolist()))
            print(f"saved {args.save} (8-bit rounding kept {same}/{args.k} of the adversarial top-{args.k})")
    return 0
