"""`robret demo`: the main job on bundled defaults, printed (what `make demo` runs).

Steps: load the default encoder (lipsim:demo when bundled; else a preset with random weights, said
loudly), embed the sample photos, print distances, certified 2AFC radii and a certified top-k for a
query photo, with radii stated in the query image's own pixel space.
"""
from __future__ import annotations

import numpy as np
import torch


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the bundled sample photos",
                       description="Embed scikit-image's sample photos with the default encoder, print "
                       "distances, certified 2AFC radii and a certified top-k for a query.")
    p.add_argument("--encoder", default=None, help="encoder spec (default: lipsim:demo, or lipsim:cpu-small "
                   "with random weights when no demo model is bundled)")
    p.add_argument("-k", type=int, default=3, help="top-k to certify (default 3)")
    p.set_defaults(func=run)


def _pick_encoder(spec):
    from encoder import load_encoder
    from encoder.registry import bundled_weights

    if spec is None:
        spec = "lipsim:demo" if "demo" in bundled_weights("lipsim") else "lipsim:cpu-small"
    return load_encoder(spec)


def run(args) -> int:
    from encoder.certify import certify_topk, twoafc_radius
    from encoder.samples import sample_photos

    enc = _pick_encoder(args.encoder)
    print(f"encoder: {enc.name}  dim={enc.dim}  input={enc.input_size}px  L={enc.lipschitz}")
    if "random" in enc.name:
        print("  NOTE: random weights — numbers below show the machinery, not perceptual quality.")
    photos = sample_photos()
    names = list(photos)
    with torch.no_grad():
        x = torch.cat([enc.preprocess(photos[n]) for n in names])
        emb = enc.embed(x)
    print(f"\nembedded {len(names)} sample photos")

    # A query: the first photo, slightly darkened (a realistic edit), in its own pixel space.
    query_name = names[0]
    q_img = photos[query_name]
    from encoder.preprocess import pil_to_tensor, resize

    q_full = (pil_to_tensor(q_img) * 0.9).clamp(0, 1)
    with torch.no_grad():
        q = enc.embed(resize(q_full, enc.input_size)[None])[0]
    dist = 1 - emb @ q
    print(f"\nquery: '{query_name}' darkened by 10% ({q_full.shape[2]}×{q_full.shape[1]} px)")
    print(" distance to each photo (closest 5):")
    for i in torch.argsort(dist)[:5].tolist():
        print(f"   {names[i]:<22} {dist[i].item():.4f}")

    if enc.lipschitz is None:
        print("\nno Lipschitz bound: no certificates for this encoder")
        return 0
    norm = enc.input_norm(tuple(q_full.shape[1:]))
    k = min(args.k, len(names) - 1)
    cert = certify_topk(q.numpy(), emb.numpy(), k, enc.lipschitz).scaled(norm)
    print(f"\ncertified top-{k} (radii in ℓ2 over the query's own [0,1] pixels; resize norm {norm:.4f}):")
    for rank, (pos, s, r) in enumerate(zip(cert.positions, cert.scores, cert.radius), 1):
        print(f"   {rank}. {names[pos]:<22} score {s:.4f}  stays in top-{k} for ‖δ‖ < {r:.4f}")
    print(f"   top-{k} set certified for ‖δ‖ < {cert.set_radius:.4f}")

    # 2AFC: reference = query photo, x0 = the darkened copy, x1 = the next photo.
    e0, e1 = q.numpy()[None], emb[1].numpy()[None]
    r2 = twoafc_radius(emb[0].numpy()[None], e0, e1, enc.lipschitz)[0]
    d0, d1 = float(1 - emb[0] @ q), float(1 - emb[0] @ emb[1])
    print(f"\n2AFC: ref '{names[0]}', x0 = its darkened copy (d={d0:.4f}), x1 = '{names[1]}' (d={d1:.4f})")
    print(f"   decision {'x0' if d0 < d1 else 'x1'} certified for ‖δ‖ < {r2:.4f} at the encoder input")
    return 0
