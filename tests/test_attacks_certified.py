"""No attack ever breaks a certified result inside its radius (and the attacks are strong enough to
break it just outside, on an encoder whose bound is nearly tight)."""
from __future__ import annotations

import math

import pytest
import torch

from encoder.certify import certify_topk
from encoder.protocol import TorchEncoder
from retrieval.attacks import (ImageEmbedder, PGDConfig, autoattack_untargeted, greedy_top1_misrank,
                               misrank_top1, topk_targeted, topk_untargeted)

from _adversarial_fixtures import encoder, gallery_embeddings, small_benchmark


class NearlyLinearEncoder(TorchEncoder):
    """e(x) = f/‖f‖, f = [W(x − ½), 1] with ‖W‖₂ = 1: 1-Lipschitz (‖f‖ ≥ 1 makes the normalisation the
    projection onto the unit ball), and nearly linear near x = ½, so the certificate is close to tight."""

    def __init__(self, size: int = 6, dim: int = 5, seed: int = 0):
        super().__init__()
        self.name, self.input_size, self.dim, self.lipschitz = "toy", size, dim + 1, 1.0
        w = torch.randn(dim, 3 * size * size, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("w", w / torch.linalg.matrix_norm(w, 2))

    def _embed(self, x):
        f = torch.cat([(x.flatten(1) - 0.5) @ self.w.T, torch.ones_like(x[:, :1, 0, 0])], 1)
        return f / f.norm(dim=1, keepdim=True)


def _toy_data():
    g = torch.Generator().manual_seed(3)
    gallery_x = (0.5 + 0.15 * torch.randn(20, 3, 6, 6, generator=g)).clamp(0, 1)
    queries = (gallery_x[:8] + 0.05 * torch.randn(8, 3, 6, 6, generator=g)).clamp(0, 1)
    return queries, gallery_x


def _setup(spec):
    if spec == "toy":
        enc = NearlyLinearEncoder()
        queries, gallery_x = _toy_data()
        gallery = enc.embed(gallery_x).detach()
        return enc, queries, gallery
    ds = small_benchmark()  # real encoders: two queries keep the test fast; the toy takes eight
    return encoder(spec), ds.queries[:2], gallery_embeddings(spec)


def _radius(emb, q, gallery, k):
    lip = emb.image_lipschitz(tuple(q.shape[-2:]))
    cert = certify_topk(emb.embed(q)[0].double().numpy(), gallery.double().numpy(), k, lip)
    return cert.set_radius, torch.as_tensor(cert.positions)


def _top(emb, x, gallery, k):
    return set((emb.embed(x) @ gallery.T).topk(k, dim=1).indices[0].tolist())


@pytest.mark.parametrize("spec", ["toy", "pixels", "lipsim:cpu-tiny"])
def test_no_attack_changes_a_certified_top1_or_topk_inside_its_radius(spec):
    enc, queries, gallery = _setup(spec)
    emb = ImageEmbedder(enc)
    n_pixels = queries[0].numel()
    steps = 20 if spec == "toy" else 8
    checked = 0
    for i in range(queries.shape[0]):
        q = queries[i:i + 1]
        r1, top1 = _radius(emb, q, gallery, 1)
        if r1 <= 1e-6:
            continue
        checked += 1
        eps = 0.99 * r1
        l2 = PGDConfig(norm="l2", eps=eps, steps=steps)
        x_adv, hit = misrank_top1(emb, q, gallery, top1, config=l2)
        assert hit.item() == 1 and _top(emb, x_adv, gallery, 1) == {int(top1[0])}
        x_adv, hit = autoattack_untargeted(emb, q, gallery, norm="L2", eps=eps, version="custom",
                                           attacks=["apgd-ce", "apgd-t"], n_target_classes=2, n_iter=steps)
        assert hit.item() == 1 and _top(emb, x_adv, gallery, 1) == {int(top1[0])}
        linf = PGDConfig(norm="linf", eps=eps / math.sqrt(n_pixels), steps=steps)  # ℓ∞ ball inside the ℓ2 ball
        res = greedy_top1_misrank(emb, q, gallery, config=linf)
        assert _top(emb, res.x_adv, gallery, 1) == {int(top1[0])}

        r3, top3 = _radius(emb, q, gallery, 3)
        if r3 > 1e-6:
            cfg = PGDConfig(norm="l2", eps=0.99 * r3, steps=steps)
            res = topk_untargeted(emb, q, gallery, k=3, config=cfg)
            assert res.overlap.item() == 1.0 and _top(emb, res.x_adv, gallery, 3) == set(top3.tolist())
            outsider = int((emb.embed(q) @ gallery.T).argsort(descending=True)[0, 3])
            res = topk_targeted(emb, q, gallery, outsider, k=3, config=cfg)
            assert not bool(res.success[0])
    assert checked > 0, "no query had a positive certified radius: the test checked nothing"


def test_the_same_attacks_do_break_the_nearly_tight_encoder_just_outside_the_radius():
    enc, queries, gallery = _setup("toy")
    emb = ImageEmbedder(enc)
    broken = 0
    for i in range(queries.shape[0]):
        q = queries[i:i + 1]
        r1, top1 = _radius(emb, q, gallery, 1)
        _, hit = misrank_top1(emb, q, gallery, top1, config=PGDConfig(norm="l2", eps=2.0 * r1 + 1e-3, steps=50))
        broken += int(hit.item() == 0)
    assert broken >= queries.shape[0] // 2
