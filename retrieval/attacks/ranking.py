"""robrank's adversarial ranking attacks on any Encoder, against a candidate set of embeddings.

Definitions follow Zhou et al., "Adversarial Ranking Attack and Defense" (ECCV 2020) and
"Adversarial Attack and Defense in Deep Ranking" (arXiv 2106.03614), and Zhou & Patel, CVPR 2022
(arXiv 2203.01439), as implemented in robrank (github.com/cdluminate/robrank, `attacks/advrank*.py`,
profile `rob224`). Distances are the encoders' cosine distance d(a, b) = 1 − ⟨a, b⟩ on unit vectors.
q is the perturbed query's embedding, X the candidate set (gallery), N = |X|; every objective is
minimised by PGD (encoder/attack/pgd.py) and is a mean over the hinge terms:

  QA+  (query attack, raise M random candidates C):   relu(d(q, c) − d(q, x)),  c ∈ C, x ∈ X
  QA−  (query attack, bury M of the top-1% of q):      relu(d(q, x) − d(q, c))
  SP-QA  QA± + ξ·QA+(top-5 of q)  (semantics-preserving; ξ = min(exp(κ·L_sp), 1e9), not backpropagated)
  CA+  (candidate attack: perturb a gallery image c so that W random queries rank it higher):
                                                       relu(d(c, w) − d(x, w)),  w ∈ W, x ∈ X
  CA−  (the same, W drawn from c's top-1% neighbours, pushing c down): relu(d(x, w) − d(c, w))
  ES   (embedding shift):       −‖e(x) − e(x0)‖
  TMA  (targeted mismatch, Tolias et al. ICCV 2019; a random target t):  1 − ⟨q, e_t⟩
  LTM  (learning-to-misrank, Wang et al. CVPR 2020):   relu(max_{x ∉ y} d(q, x) − min_{x ∈ y} d(q, x))
  GTM  (greedy top-1 misrank): d(q, u), u = nearest candidate whose label differs from the top-1's
  GTT  (greedy top-1 translocation): QA− with C = {the clean top-1}

Reported numbers (the ones ERS normalises, see retrieval/metrics.py), measured after the attack:
CA± and QA± the percentile rank (prank, %) of the targets; TMA the mean cosine to the target; ES:D
the mean ‖e(x_adv) − e(x)‖ (∈ [0, 2]) and ES:R the Recall@1 (%); LTM and GTM the Recall@1 (%); GTT
retain@4 (%), the share of queries whose clean top-1 is still among the top 4.

`self_index` gives, per perturbed image, its own position in the gallery (robrank's protocol, where
the validation set is both queries and candidates) or −1; the item itself is then left out of
target sampling, ranks and recalls. Without labels every gallery item is its own class and the
ground truth of a query is its clean top-1 (so "Recall@1 after" reads "the top-1 did not move").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..metrics import percentile_rank
from ._embed import as_embedder, as_tensor
from encoder.attack import ROBRANK_LINF, Callback, PGDConfig, perturbation_norm, pgd

__all__ = [
    "ATTACKS", "AttackResult", "query_attack", "candidate_attack", "embedding_shift", "targeted_mismatch",
    "learning_to_misrank", "greedy_top1_misrank", "greedy_top1_translocation", "run_attack",
]

ATTACKS = ("CA+", "CA-", "QA+", "QA-", "SPQA+", "SPQA-", "ES", "TMA", "LTM", "GTM", "GTT")

M_GT = 5  # robrank: neighbours kept in place by SP-QA
TOP_FRACTION = 0.01  # robrank: QA− / CA− targets come from the top 1% of the ranking
XI_SCALE = 1e4  # robrank's "moderate" ξ schedule: ξ = exp(κ·L_sp), κ = 1e4, capped at 1e9


@dataclass
class AttackResult:
    """One attack on a batch: adversarial images and robrank's numbers before and after."""

    attack: str
    x_adv: torch.Tensor  # (B, 3, H, W) in [0, 1], inside the threat set of `config`
    perturbation: torch.Tensor  # (B,) ‖x_adv − x‖ in config.norm
    before: dict[str, float]  # the reported numbers on the clean images
    after: dict[str, float]  # the same numbers on x_adv
    config: PGDConfig
    loss: torch.Tensor | None = None  # (B,) objective at x_adv (minimised)
    clean_loss: torch.Tensor | None = None  # (B,) objective at the clean images
    targets: torch.Tensor | None = None  # gallery indices the attack aimed at, when it has any
    per_query: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample outcomes after


# ---------------------------------------------------------------------------------------------
# Helpers


def _prepare(encoder, images, gallery, self_index):
    """Checked inputs: (embedder, images, gallery, self_index (B,), self mask (B, N))."""
    emb = as_embedder(encoder)
    images = as_tensor(images, emb.device).detach()
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("images must lie in [0, 1]")
    g = as_tensor(gallery, emb.device)
    if g.dim() != 2:
        raise ValueError(f"gallery must be (N, D) embeddings, got {tuple(g.shape)}")
    b = images.shape[0]
    if self_index is None:
        si = torch.full((b,), -1, dtype=torch.long, device=emb.device)
    else:
        si = as_tensor(self_index, emb.device, dtype=None).long().view(-1)
        if si.shape[0] != b:
            raise ValueError("self_index needs one entry per image")
    return emb, images, g, si, _self_mask(b, g.shape[0], si)


def _self_mask(b: int, n: int, self_index: torch.Tensor) -> torch.Tensor:
    """(B, N) bool, True at each image's own gallery position."""
    mask = torch.zeros(b, n, dtype=torch.bool, device=self_index.device)
    rows = (self_index >= 0).nonzero().view(-1)
    mask[rows, self_index[rows]] = True
    return mask


def _dist(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return 1 - e @ g.T


def _ranked(d: torch.Tensor, self_mask: torch.Tensor) -> torch.Tensor:
    """Gallery indices by increasing distance, the item itself last (B, N)."""
    return d.masked_fill(self_mask, math.inf).argsort(dim=1, stable=True)


def _prank(d: torch.Tensor, targets: torch.Tensor, self_index: torch.Tensor) -> torch.Tensor:
    """Per row, robrank's percentile rank (%) of the targets (B, M), the item itself left out."""
    pr = percentile_rank(1 - d, targets, self_index)
    return torch.as_tensor(pr, dtype=torch.float32, device=d.device)


def _sample_uniform(n: int, b: int, m: int, self_index: torch.Tensor, gen) -> torch.Tensor:
    """(B, M) uniform gallery indices, never the row's own position (robrank's global sampling)."""
    si = self_index.view(-1, 1)
    has_self = si >= 0
    high = (n - has_self.long()).clamp_min(1)  # choices per row: the others
    u = torch.rand((b, m), generator=gen).to(self_index.device)
    idx = torch.minimum((u * high).long(), high - 1)
    return torch.where(has_self & (idx >= si), idx + 1, idx)


def _topmost(n: int) -> int:
    return max(1, int(n * TOP_FRACTION))


def _labels(labels, gallery_labels, d0, self_mask, device):
    """Ground truth: given labels, or each item its own class and the clean top-1 as the answer."""
    n = d0.shape[1]
    gl = torch.arange(n, device=device) if gallery_labels is None else as_tensor(gallery_labels, device, None).long()
    if labels is None:
        top1 = _ranked(d0, self_mask)[:, 0]
        ql = gl[top1]
    else:
        ql = as_tensor(labels, device, None).long().view(-1)
    return ql, gl


def _recall1(d: torch.Tensor, ql, gl, self_mask) -> torch.Tensor:
    """Per row: 1 if the top-1 (self excluded) has the query's label."""
    top1 = _ranked(d, self_mask)[:, 0]
    return (gl[top1] == ql).float()


def _finish(name, emb, x, outcome, config, before, after_fn, targets=None):
    x_adv = outcome.x_adv.detach()
    after, per = after_fn(emb.embed(x_adv))
    return AttackResult(name, x_adv, perturbation_norm(x_adv - x, config.norm), before, after, config,
                        outcome.loss, outcome.clean_loss, targets, per)


def _hinge_query(e, c, g, pm, keep):
    """QA objective per row: mean over (c, x) of relu(±(d(q,c) − d(q,x))); `keep` masks X (B, N)."""
    a = 1 - (e[:, None, :] * c).sum(-1)  # (B, M)
    b = _dist(e, g)  # (B, N)
    diff = a[:, :, None] - b[:, None, :]
    h = (diff if pm == "+" else -diff).clamp_min(0) * keep[:, None, :]
    return h.sum((1, 2)) / (keep.sum(1) * c.shape[1]).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# The attacks


@torch.no_grad()
def _select_qa(d0, self_mask, self_index, pm, M, sp, gen):
    b, n = d0.shape
    dev = d0.device
    ranked = _ranked(d0, self_mask)
    if pm == "+":
        targets = _sample_uniform(n, b, M, self_index, gen)
        gts = ranked[:, :M_GT] if sp else None
    else:
        top = min(max(_topmost(n), M + (1 if sp else 0)), n - 1)
        perm = torch.stack([torch.randperm(top, generator=gen) for _ in range(b)]).to(dev)
        targets = ranked.gather(1, perm[:, :M])
        gts = None
        if sp:
            rest = perm[:, M:].sort(1).values[:, :M_GT]
            gts = ranked.gather(1, rest)
    return targets, gts


def query_attack(encoder, images, gallery, *, pm: str = "+", M: int = 1, semantic_preserving: bool = False,
                 self_index=None, config: PGDConfig = ROBRANK_LINF, generator: torch.Generator | None = None,
                 callback: Callback | None = None, xi_scale: float = XI_SCALE) -> AttackResult:
    """QA+ / QA− (and SP-QA with `semantic_preserving`): perturb queries to raise / bury M targets.

    images: (B, 3, H, W) queries in [0, 1]; gallery: (N, D) unit-norm candidate embeddings.
    Reported: "prank" (%) of the targets; SP-QA also "gt_prank" of the top-5 it keeps in place.
    """
    if pm not in ("+", "-"):
        raise ValueError("pm must be '+' or '-'")
    emb, x, g, si, smask = _prepare(encoder, images, gallery, self_index)
    keep = (~smask).float()
    e0 = emb.embed(x)
    d0 = _dist(e0, g)
    targets, gts = _select_qa(d0, smask, si, pm, M, semantic_preserving, generator)
    c, cgt = g[targets], (g[gts] if gts is not None else None)

    def objective(xa):
        e = emb(xa)
        loss = _hinge_query(e, c, g, pm, keep)
        if cgt is not None:
            l_sp = _hinge_query(e, cgt, g, "+", keep)
            xi = torch.exp(xi_scale * l_sp.detach()).clamp_max(1e9)
            loss = loss + xi * l_sp
        return loss

    def report(d):
        out = {"prank": _prank(d, targets, si)}
        if gts is not None:
            out["gt_prank"] = _prank(d, gts, si)
        return out

    before = {k: float(v.mean()) for k, v in report(d0).items()}
    outcome = pgd(x, objective, config, callback, generator)

    def after_fn(e_adv):
        per = report(_dist(e_adv, g))
        return {k: float(v.mean()) for k, v in per.items()}, per

    name = ("SPQA" if semantic_preserving else "QA") + pm
    return _finish(name, emb, x, outcome, config, before, after_fn, targets)


def candidate_attack(encoder, images, gallery, self_index, *, pm: str = "+", W: int = 1, query_pool=None,
                     config: PGDConfig = ROBRANK_LINF, generator: torch.Generator | None = None,
                     callback: Callback | None = None) -> AttackResult:
    """CA+ / CA−: perturb gallery images (candidates) so that W queries rank them higher / lower.

    images: the candidates' images; self_index: their positions in `gallery` (their clean copies are
    left out of X). Queries are drawn from `query_pool` (embeddings; default the gallery itself, as
    robrank does): uniformly for CA+, from each candidate's top 1% for CA−.
    Reported: "prank" (%), the share of X ranked ahead of the candidate for its queries.
    """
    if pm not in ("+", "-"):
        raise ValueError("pm must be '+' or '-'")
    emb, x, g, si, smask = _prepare(encoder, images, gallery, self_index)
    b, n = x.shape[0], g.shape[0]
    keep = (~smask).float()
    if query_pool is None:
        pool, pool_self = g, si
    else:
        pool, pool_self = as_tensor(query_pool, emb.device), torch.full_like(si, -1)
    p = pool.shape[0]
    pmask = _self_mask(b, p, pool_self)
    e0 = emb.embed(x)
    with torch.no_grad():
        if pm == "+":
            qidx = _sample_uniform(p, b, W, pool_self, generator)
        else:
            top = min(_topmost(p), p - 1)
            ranked = _ranked(_dist(e0, pool), pmask)
            qidx = ranked.gather(1, torch.randint(top, (b, W), generator=generator).to(emb.device))
    qw = pool[qidx]  # (B, W, D)
    dxq = 1 - torch.einsum("nd,bwd->bnw", g, qw)  # (B, N, W): d(x, w), fixed

    def objective(xa):
        e = emb(xa)
        a = 1 - (e[:, None, :] * qw).sum(-1)  # (B, W): d(c, w)
        diff = a[:, None, :] - dxq
        h = (diff if pm == "+" else -diff).clamp_min(0) * keep[:, :, None]
        return h.sum((1, 2)) / (keep.sum(1) * W).clamp_min(1)

    def prank(e):
        a = 1 - (e[:, None, :] * qw).sum(-1)
        closer = (dxq < a[:, None, :]) & ~smask[:, :, None]
        return 100.0 * closer.float().sum(1).mean(1) / n

    before = {"prank": float(prank(e0).mean())}
    outcome = pgd(x, objective, config, callback, generator)

    def after_fn(e_adv):
        pr = prank(e_adv)
        return {"prank": float(pr.mean())}, {"prank": pr}

    return _finish("CA" + pm, emb, x, outcome, config, before, after_fn, qidx)


def embedding_shift(encoder, images, gallery, labels=None, gallery_labels=None, *, self_index=None,
                    config: PGDConfig = ROBRANK_LINF, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> AttackResult:
    """ES: push e(x) as far as possible from e(x0). Reported: "shift" (ES:D) and "recall@1" (ES:R, %).

    The objective −‖e(x) − e(x0) − η‖ uses a fixed random η of norm 1e-3: at x0 the gradient of the
    distance itself is zero (robrank adds a small offset on the first step for the same reason).
    """
    emb, x, g, si, smask = _prepare(encoder, images, gallery, self_index)
    e0 = emb.embed(x)
    d0 = _dist(e0, g)
    ql, gl = _labels(labels, gallery_labels, d0, smask, emb.device)
    eta = torch.randn(e0.shape, generator=generator).to(e0)
    eta = 1e-3 * eta / eta.norm(dim=1, keepdim=True)
    ref = e0 + eta

    def objective(xa):
        return -(emb(xa) - ref).norm(dim=1)

    before = {"shift": 0.0, "recall@1": 100.0 * float(_recall1(d0, ql, gl, smask).mean())}
    outcome = pgd(x, objective, config, callback, generator)

    def after_fn(e_adv):
        shift = (e_adv - e0).norm(dim=1)
        hit = _recall1(_dist(e_adv, g), ql, gl, smask)
        return {"shift": float(shift.mean()), "recall@1": 100.0 * float(hit.mean())}, {"shift": shift, "hit": hit}

    return _finish("ES", emb, x, outcome, config, before, after_fn)


def targeted_mismatch(encoder, images, gallery, *, self_index=None, config: PGDConfig = ROBRANK_LINF,
                      generator: torch.Generator | None = None, callback: Callback | None = None) -> AttackResult:
    """TMA: pull e(x) onto a random gallery item's embedding. Reported: "cosine" to the target."""
    emb, x, g, si, _ = _prepare(encoder, images, gallery, self_index)
    e0 = emb.embed(x)
    targets = _sample_uniform(g.shape[0], x.shape[0], 1, si, generator)[:, 0]
    t = g[targets]

    def objective(xa):
        return 1 - (emb(xa) * t).sum(1)

    before = {"cosine": float((e0 * t).sum(1).mean())}
    outcome = pgd(x, objective, config, callback, generator)

    def after_fn(e_adv):
        cos = (e_adv * t).sum(1)
        return {"cosine": float(cos.mean())}, {"cosine": cos}

    return _finish("TMA", emb, x, outcome, config, before, after_fn, targets)


def _recall_attack(name, objective_for, encoder, images, gallery, labels, gallery_labels, self_index,
                   config, generator, callback):
    """Shared frame of LTM and GTM: an objective built from the clean ranking; reports Recall@1 (%)."""
    emb, x, g, si, smask = _prepare(encoder, images, gallery, self_index)
    e0 = emb.embed(x)
    d0 = _dist(e0, g)
    ql, gl = _labels(labels, gallery_labels, d0, smask, emb.device)
    objective, targets = objective_for(emb, g, d0, ql, gl, smask)
    before = {"recall@1": 100.0 * float(_recall1(d0, ql, gl, smask).mean())}
    outcome = pgd(x, objective, config, callback, generator)

    def after_fn(e_adv):
        hit = _recall1(_dist(e_adv, g), ql, gl, smask)
        return {"recall@1": 100.0 * float(hit.mean())}, {"hit": hit}

    return _finish(name, emb, x, outcome, config, before, after_fn, targets)


def learning_to_misrank(encoder, images, gallery, labels=None, gallery_labels=None, *, self_index=None,
                        config: PGDConfig = ROBRANK_LINF, generator: torch.Generator | None = None,
                        callback: Callback | None = None) -> AttackResult:
    """LTM: relu(max_{x ∉ y} d(q, x) − min_{x ∈ y} d(q, x)) — every match below every non-match."""

    def build(emb, g, d0, ql, gl, smask):
        same = (gl[None, :] == ql[:, None]) & ~smask
        diff = (gl[None, :] != ql[:, None]) & ~smask
        if not bool(same.any(1).all()) or not bool(diff.any(1).all()):
            raise ValueError("LTM needs, for every query, a gallery item of its class and one of another")

        def objective(xa):
            d = _dist(emb(xa), g)
            max_neg = d.masked_fill(~diff, -math.inf).amax(1)
            min_pos = d.masked_fill(~same, math.inf).amin(1)
            return (max_neg - min_pos).clamp_min(0)

        return objective, None

    return _recall_attack("LTM", build, encoder, images, gallery, labels, gallery_labels, self_index,
                          config, generator, callback)


def greedy_top1_misrank(encoder, images, gallery, labels=None, gallery_labels=None, *, self_index=None,
                        config: PGDConfig = ROBRANK_LINF, generator: torch.Generator | None = None,
                        callback: Callback | None = None) -> AttackResult:
    """GTM: pull q towards the nearest candidate whose label differs from that of the clean top-1."""

    def build(emb, g, d0, ql, gl, smask):
        ranked = _ranked(d0, smask)
        top_label = gl[ranked[:, 0]]
        other = (gl[None, :] != top_label[:, None]) & ~smask
        if not bool(other.any(1).all()):
            raise ValueError("GTM needs a gallery item of another label than the top-1")
        target = d0.masked_fill(~other, math.inf).argmin(1)
        u = g[target]

        def objective(xa):
            return 1 - (emb(xa) * u).sum(1)

        return objective, target

    return _recall_attack("GTM", build, encoder, images, gallery, labels, gallery_labels, self_index,
                          config, generator, callback)


def greedy_top1_translocation(encoder, images, gallery, *, self_index=None, config: PGDConfig = ROBRANK_LINF,
                              generator: torch.Generator | None = None, callback: Callback | None = None,
                              k: int = 4) -> AttackResult:
    """GTT: bury the clean top-1 (QA− on it). Reported: "retain@4" (%), the top-1 still in the top 4."""
    emb, x, g, si, smask = _prepare(encoder, images, gallery, self_index)
    keep = (~smask).float()
    e0 = emb.embed(x)
    top1 = _ranked(_dist(e0, g), smask)[:, 0]
    c = g[top1][:, None, :]

    def objective(xa):
        return _hinge_query(emb(xa), c, g, "-", keep)

    def retain(d):
        return (_ranked(d, smask)[:, :k] == top1[:, None]).any(1).float()

    before = {f"retain@{k}": 100.0 * float(retain(_dist(e0, g)).mean())}
    outcome = pgd(x, objective, config, callback, generator)

    def after_fn(e_adv):
        r = retain(_dist(e_adv, g))
        return {f"retain@{k}": 100.0 * float(r.mean())}, {"retain": r}

    return _finish("GTT", emb, x, outcome, config, before, after_fn, top1)


def run_attack(name: str, encoder, images, gallery, labels=None, gallery_labels=None, *, self_index=None,
               config: PGDConfig = ROBRANK_LINF, generator: torch.Generator | None = None,
               callback: Callback | None = None, **options) -> AttackResult:
    """Dispatch by robrank's name (ATTACKS). CA± perturb gallery images: pass their `self_index`."""
    common = dict(config=config, generator=generator, callback=callback)
    if name in ("QA+", "QA-", "SPQA+", "SPQA-"):
        return query_attack(encoder, images, gallery, pm=name[-1], semantic_preserving=name.startswith("SP"),
                            self_index=self_index, **common, **options)
    if name in ("CA+", "CA-"):
        if self_index is None:
            raise ValueError("CA attacks perturb gallery images: give their self_index")
        return candidate_attack(encoder, images, gallery, self_index, pm=name[-1], **common, **options)
    if name == "ES":
        return embedding_shift(encoder, images, gallery, labels, gallery_labels, self_index=self_index, **common)
    if name == "TMA":
        return targeted_mismatch(encoder, images, gallery, self_index=self_index, **common)
    if name == "LTM":
        return learning_to_misrank(encoder, images, gallery, labels, gallery_labels, self_index=self_index, **common)
    if name == "GTM":
        return greedy_top1_misrank(encoder, images, gallery, labels, gallery_labels, self_index=self_index, **common)
    if name == "GTT":
        return greedy_top1_translocation(encoder, images, gallery, self_index=self_index, **common, **options)
    raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
