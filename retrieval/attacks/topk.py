"""Attacks on what a user sees: the top-k list of a query (for the UI) and Recall@1 (for benchmarks).

With scores s_j = ⟨e(x), g_j⟩ over a gallery G (N, D), and T the clean top-k of the query:

  untargeted top-k (minimise overlap with T):  Σ_{i ∈ T} relu(s_i − τ + m),
      τ = the k-th largest score outside T; at zero loss k outsiders beat every member of T.
  targeted top-k (push item t into the top-k):  relu(τ_t − s_t + m),
      τ_t = the k-th largest score among the other items; at zero loss t is in the top-k.
  top-1 misrank (break Recall@1; a margin loss, Carlini & Wagner 2017):
      max_{j : label j = y} s_j − max_{j : label j ≠ y} s_j,  successful below zero.

All run PGD in [0, 1] pixel space on the image as given (encoder/attack/pgd.py), and report the
adversarial image, its perturbation norms and, step by step, progress through `callback`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._embed import as_embedder, as_tensor
from encoder.attack import Callback, PGDConfig, pgd

__all__ = ["TopKAttackResult", "topk_untargeted", "topk_targeted", "misrank_top1", "topk_indices"]


@dataclass
class TopKAttackResult:
    """Outcome of a top-k attack on a batch of queries (usually one)."""

    x_adv: torch.Tensor  # (B, 3, H, W) in [0, 1]
    l2: torch.Tensor  # (B,) ‖x_adv − x‖₂
    linf: torch.Tensor  # (B,) ‖x_adv − x‖∞
    clean_topk: torch.Tensor  # (B, k) gallery indices before
    adv_topk: torch.Tensor  # (B, k) gallery indices after
    overlap: torch.Tensor  # (B,) |clean ∩ adv| / k
    success: torch.Tensor  # (B,) bool: overlap 0 (untargeted) or target in the top-k (targeted)
    config: PGDConfig


def topk_indices(e: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) gallery indices of the k highest scores ⟨e, g⟩, best first."""
    return (e @ gallery.T).topk(k, dim=1).indices


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, :, None] == b[:, None, :]).any(2).float().mean(1)


def _setup(encoder, images, gallery, k):
    emb = as_embedder(encoder)
    x = as_tensor(images, emb.device).detach()
    if x.dim() == 3:
        x = x[None]
    g = as_tensor(gallery, emb.device)
    if not 1 <= k < g.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the gallery size − 1 ({g.shape[0] - 1})")
    return emb, x, g


def _kth_largest(s: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th largest of s outside `exclude` (B, N) bool."""
    return s.masked_fill(exclude, -math.inf).topk(k, dim=1).values[:, -1]


def topk_untargeted(encoder, images, gallery, k: int = 5, config: PGDConfig | None = None,
                    margin: float = 0.0, callback: Callback | None = None,
                    generator: torch.Generator | None = None) -> TopKAttackResult:
    """Perturb the query(ies) so that as few as possible of its clean top-k stay in the top-k.

    images: (B, 3, H, W) or (3, H, W) in [0, 1] at any size; gallery: (N, D) unit-norm embeddings.
    Default config: ℓ2, ε = 0.5, 50 steps.
    """
    config = config or PGDConfig(norm="l2", eps=0.5, steps=50)
    emb, x, g = _setup(encoder, images, gallery, k)
    e0 = emb.embed(x)
    clean = topk_indices(e0, g, k)
    in_t = torch.zeros(x.shape[0], g.shape[0], dtype=torch.bool, device=g.device).scatter_(1, clean, True)
    k_out = min(k, g.shape[0] - k)

    def objective(xa):
        s = emb(xa) @ g.T
        tau = _kth_largest(s, in_t, k_out)
        return ((s - tau[:, None] + margin).clamp_min(0) * in_t).sum(1)

    x_adv = pgd(x, objective, config, callback, generator).x_adv
    adv = topk_indices(emb.embed(x_adv), g, k)
    ov = _overlap(clean, adv)
    d = (x_adv - x).flatten(1)
    return TopKAttackResult(x_adv, d.norm(dim=1), d.abs().amax(1), clean, adv, ov, ov == 0, config)


def topk_targeted(encoder, images, gallery, target, k: int = 5, config: PGDConfig | None = None,
                  margin: float = 0.0, callback: Callback | None = None,
                  generator: torch.Generator | None = None) -> TopKAttackResult:
    """Perturb the query(ies) so that gallery item `target` (int, or one per query) enters the top-k."""
    config = config or PGDConfig(norm="l2", eps=0.5, steps=50)
    emb, x, g = _setup(encoder, images, gallery, k)
    b, n = x.shape[0], g.shape[0]
    t = torch.as_tensor(target, device=g.device).long().view(-1).expand(b)
    if bool(((t < 0) | (t >= n)).any()):
        raise ValueError(f"target must be a gallery index in [0, {n})")
    is_t = torch.zeros(b, n, dtype=torch.bool, device=g.device).scatter_(1, t[:, None], True)
    e0 = emb.embed(x)
    clean = topk_indices(e0, g, k)

    def objective(xa):
        s = emb(xa) @ g.T
        tau = _kth_largest(s, is_t, k)
        return (tau - s.gather(1, t[:, None])[:, 0] + margin).clamp_min(0)

    x_adv = pgd(x, objective, config, callback, generator).x_adv
    adv = topk_indices(emb.embed(x_adv), g, k)
    d = (x_adv - x).flatten(1)
    return TopKAttackResult(x_adv, d.norm(dim=1), d.abs().amax(1), clean, adv, _overlap(clean, adv),
                            (adv == t[:, None]).any(1), config)


def misrank_top1(encoder, images, gallery, labels, gallery_labels=None, *, self_index=None,
                 config: PGDConfig | None = None, callback: Callback | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin attack on Recall@1. Returns (x_adv, hit) with hit[i] = 1 when the top-1 is still right.

    labels: (B,) the queries' classes; gallery_labels: (N,) (default: item i is class i);
    self_index: the query's own gallery position or −1 (left out of the ranking).
    """
    config = config or PGDConfig(norm="l2", eps=0.5, steps=50)
    emb = as_embedder(encoder)
    x = as_tensor(images, emb.device).detach()
    g = as_tensor(gallery, emb.device)
    n = g.shape[0]
    gl = torch.arange(n, device=g.device) if gallery_labels is None else as_tensor(gallery_labels, g.device, None).long()
    y = as_tensor(labels, g.device, None).long().view(-1)
    same = gl[None, :] == y[:, None]
    if self_index is not None:
        si = as_tensor(self_index, g.device, None).long().view(-1)
        own = torch.zeros_like(same)
        rows = (si >= 0).nonzero().view(-1)
        own[rows, si[rows]] = True
    else:
        own = torch.zeros_like(same)
    pos, neg = same & ~own, ~same & ~own

    def margin(e):
        # Scores lie in [−1, 1]: −3 stands for "no such item" and keeps the objective finite.
        s = e @ g.T
        return s.masked_fill(~pos, -3.0).amax(1) - s.masked_fill(~neg, -3.0).amax(1)

    def objective(xa):
        return margin(emb(xa))

    x_adv = pgd(x, objective, config, callback, generator).x_adv
    hit = (margin(emb.embed(x_adv)) > 0).float()
    return x_adv, hit
