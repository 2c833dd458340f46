"""2AFC evaluation of any Encoder: natural, certified and empirical (attacked) scores; JSON + a table.

A 2AFC triplet is a reference x and candidates x0 (left), x1 (right), with p = fraction of people
who chose x1. The encoder chooses x1 when d(x, x1) < d(x, x0), d = 1 − ⟨e(·), e(·)⟩.

Natural score (DreamSim's formula, Fu et al. 2023; LipSim uses the same):
    s_i = 1[d0 < d1]·(1 − p) + 1[d1 < d0]·p + 1[d0 = d1]·½,   score = mean_i s_i.
Certified score at ε (LipSim, Ghazanfari et al. 2024): the decision cannot change for any
perturbation of the reference with ‖δ‖₂ ≤ ε when ε < R, R = |⟨e, e0 − e1⟩| / (L·‖e0 − e1‖)
(encoder.certify.twoafc_radius). cert_i(ε) = s_i·1[R_i > ε]: with a binary p this is "correct
and radius > ε"; with a soft p it is the human agreement of a decision that provably stands
(ties have R = 0 and never count). Encoders without a Lipschitz bound get no certified score.
Both R and ε live in the ENCODER'S INPUT space: ℓ2 over [0,1] pixels of the (3, S, S) image the
encoder sees, S = input_size. The triplet images are resized to S before evaluation, so the ε's
here are not budgets on the original, larger image files.

Empirical score: the same s_i after an attack on the reference (candidates fixed), run by the
attack engine (encoder/attack/); this module supplies the objectives:
  * AutoAttack (pyautoattack, Croce & Hein 2020): APGD-CE on a two-logit classifier
    logits(x) = scale·[⟨e(x), e0⟩, ⟨e(x), e1⟩] with label round(p); ℓ2 or ℓ∞.
  * PGD: minimise the signed margin y'·(d0 − d1), y' = 2·round(p) − 1, with normalised-gradient
    (ℓ2) or sign-gradient (ℓ∞) steps and projection onto the ε-ball ∩ [0,1]; the best iterate is kept.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from .attack import PGDConfig, canonical_norm, make_autoattack, pgd, run_autoattack
from .certify import DEFAULT_SLACK, slack_for, twoafc_radius

__all__ = ["EPSILONS", "eps_label", "twoafc_sample_scores", "twoafc_score", "certified_sample_scores",
           "embed_triplets", "TwoAFCLogits", "autoattack_2afc", "pgd_2afc", "evaluate_2afc", "format_table",
           "evaluate_near_duplicates", "combine_results"]

log = logging.getLogger(__name__)

EPSILONS = (36 / 255, 72 / 255, 108 / 255, 255 / 255)


def eps_label(eps: float) -> str:
    """'36/255' for multiples of 1/255, else the number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def _t(a) -> torch.Tensor:
    return a if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))


def twoafc_sample_scores(d0, d1, p) -> torch.Tensor:
    """Per-triplet DreamSim 2AFC score: 1[d0<d1]·(1−p) + 1[d1<d0]·p + 1[d0=d1]·½."""
    d0, d1, p = _t(d0).double(), _t(d1).double(), _t(p).double()
    return (d0 < d1) * (1 - p) + (d1 < d0) * p + (d0 == d1) * 0.5


def twoafc_score(d0, d1, p) -> float:
    """Mean of `twoafc_sample_scores`."""
    return float(twoafc_sample_scores(d0, d1, p).mean())


def certified_sample_scores(e, e0, e1, p, lipschitz: float, eps: float, slack: float = DEFAULT_SLACK) -> torch.Tensor:
    """s_i·1[R_i > ε] with R from `twoafc_radius` (unit-norm embeddings (N, D), radius in input space)."""
    e, e0, e1 = _t(e).double(), _t(e0).double(), _t(e1).double()
    d0, d1 = 1 - (e * e0).sum(1), 1 - (e * e1).sum(1)
    radius = torch.as_tensor(twoafc_radius(e, e0, e1, lipschitz, slack=slack))
    return twoafc_sample_scores(d0, d1, p) * (radius > eps)


@torch.no_grad()
def embed_triplets(encoder, ref, x0, x1, batch_size: int = 64):
    """Unit-norm embeddings of the three image stacks (N, 3, S, S) → three (N, D) float tensors on CPU."""
    def run(x):
        return torch.cat([encoder.embed(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])

    return run(ref), run(x0), run(x1)


class TwoAFCLogits(nn.Module):
    """The 2AFC decision as a two-class classifier of the reference image, for AutoAttack.

    logits(x) = scale·[⟨e(x), e0⟩, ⟨e(x), e1⟩] (class 1 = "x1 is closer"). Candidate embeddings are
    fixed. AutoAttack calls the model on subsets of the batch it was given, so each input row is
    matched to its triplet by the nearest clean reference; `evaluate` guarantees that the clean
    references of one batch are more than 2ε apart, which makes the match exact.
    """

    def __init__(self, encoder, refs: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor, scale: float = 20.0):
        super().__init__()
        self.encoder, self.scale = encoder, scale
        self.refs = refs.flatten(1)
        self.e0, self.e1 = e0, e1

    def match(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.detach().flatten(1).double(), self.refs.double()).argmin(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.match(x).to(self.e0.device)
        e = self.encoder.embed(x)
        return self.scale * torch.stack([(e * self.e0[idx]).sum(1), (e * self.e1[idx]).sum(1)], dim=1)


def _separated_batches(refs: torch.Tensor, radius: float, batch_size: int) -> list[list[int]]:
    """Greedy batches of indices whose references are pairwise more than 2·radius apart (ℓ2)."""
    flat = refs.flatten(1).double()
    batches: list[list[int]] = []
    for i in range(len(refs)):
        for b in batches:
            if len(b) < batch_size and torch.cdist(flat[i:i + 1], flat[b]).min() > 2 * radius + 1e-6:
                b.append(i)
                break
        else:
            batches.append([i])
    return batches


def autoattack_2afc(encoder, ref, x0, x1, p, eps: float, norm: str = "L2", n_iter: int = 100,
                    n_restarts: int = 1, batch_size: int = 64, seed: int = 0, scale: float = 20.0) -> torch.Tensor:
    """Adversarial references from pyautoattack's APGD-CE (version 'custom', encoder.attack's wrapper:
    the step-size schedule follows `n_iter`); returns x_adv (N, 3, S, S)."""
    norm = canonical_norm(norm)
    device = encoder.device
    e, e0, e1 = embed_triplets(encoder, ref, x0, x1)
    y = torch.round(_t(p).float()).long()
    radius = eps if norm == "l2" else eps * math.sqrt(ref[0].numel())
    out = ref.clone()
    for b in _separated_batches(ref, radius, batch_size):
        model = TwoAFCLogits(encoder, ref[b].to(device), e0[b].to(device), e1[b].to(device), scale=scale)
        aa = make_autoattack(model, norm=norm, eps=eps, device=device, version="custom", attacks=["apgd-ce"],
                             seed=seed, n_iter=n_iter, n_restarts=n_restarts)
        out[b] = run_autoattack(aa, ref[b].to(device), y[b].to(device), batch_size=len(b)).cpu()
    return out


def pgd_2afc(encoder, ref, x0, x1, p, eps: float, norm: str = "L2", steps: int = 50, step_size: float | None = None,
             batch_size: int = 64, seed: int = 0, restarts: int = 1) -> torch.Tensor:
    """PGD (encoder.attack.pgd) on the reference minimising y'·(d0 − d1); returns the best x_adv (N, 3, S, S).

    Step 2.5·ε/steps unless given (ℓ2 normalised-gradient or ℓ∞ sign steps); restarts after the
    first start at a random point of the ball drawn from a generator seeded with `seed`.
    """
    config = PGDConfig(norm=canonical_norm(norm), eps=eps, steps=steps, step=step_size or 2.5 * eps / max(steps, 1),
                       restarts=restarts)
    _, e0, e1 = embed_triplets(encoder, ref, x0, x1)
    ysign = 2 * torch.round(_t(p).float()) - 1
    g = torch.Generator().manual_seed(seed)
    out = ref.clone()
    device = encoder.device
    for s in range(0, len(ref), batch_size):
        a0, a1, ys = e0[s:s + batch_size].to(device), e1[s:s + batch_size].to(device), ysign[s:s + batch_size].to(device)

        def margin(x):  # = y'·(d0 − d1): negative when the decision is flipped
            e = encoder.embed(x)
            return ys * ((e * a1).sum(1) - (e * a0).sum(1))

        out[s:s + batch_size] = pgd(ref[s:s + batch_size].to(device), margin, config, generator=g).x_adv.cpu()
    return out


def evaluate_2afc(encoder, ref, x0, x1, p, eps=EPSILONS, attacks=("autoattack-L2",), attack_eps=None,
                  attack_limit: int | None = None, n_iter: int = 100, seed: int = 0, batch_size: int = 64) -> dict:
    """Natural, certified and attacked 2AFC scores of `encoder` on triplets at its input size.

    ref, x0, x1: float (N, 3, S, S) in [0,1] with S = encoder.input_size; p: (N,) P(x1 chosen).
    eps: certification budgets (ℓ2, encoder input space). attacks: any of "autoattack-L2",
    "autoattack-Linf", "pgd-L2", "pgd-Linf"; attack_eps: {attack: [ε, …]} (default: `eps` for ℓ2,
    (1, 2, 4)/255 for ℓ∞); attack_limit: attack only the first that many triplets (scores are then
    over that subset, reported as `attacked_n`). Returns a JSON-able dict.
    """
    for name, x in (("ref", ref), ("x0", x0), ("x1", x1)):
        if tuple(x.shape[-2:]) != (encoder.input_size, encoder.input_size):
            raise ValueError(f"{name} images are {tuple(x.shape[-2:])}; {encoder.name} takes {encoder.input_size} px")
    p = _t(p).float()
    e, e0, e1 = embed_triplets(encoder, ref, x0, x1, batch_size)
    d0, d1 = 1 - (e * e0).sum(1), 1 - (e * e1).sum(1)
    result = {
        "encoder": encoder.name, "n": len(p), "input_size": encoder.input_size, "lipschitz": encoder.lipschitz,
        "radius_space": f"l2 over [0,1] pixels of the encoder input (3x{encoder.input_size}x{encoder.input_size})",
        "natural": twoafc_score(d0, d1, p), "certified": {}, "empirical": {},
    }
    if encoder.lipschitz is not None:
        # the margin ⟨ê(x), ê0 − ê1⟩ carries the float error of ê(x) and ê(x + δ): slack 2ε·‖ê0 − ê1‖ ≤ 4ε
        slack = slack_for(getattr(encoder, "float_error", None))
        radius = twoafc_radius(e, e0, e1, encoder.lipschitz, slack=slack)
        result["median_radius"] = float(np.median(radius))
        result["slack"] = slack
        for ep in eps:
            result["certified"][eps_label(ep)] = float(
                certified_sample_scores(e, e0, e1, p, encoder.lipschitz, ep, slack=slack).mean())
    n_att = len(p) if attack_limit is None else min(attack_limit, len(p))
    sl = slice(0, n_att)
    defaults = {"L2": tuple(eps), "Linf": (1 / 255, 2 / 255, 4 / 255)}
    for attack in attacks:
        kind, _, norm = attack.partition("-")
        if kind not in ("autoattack", "pgd") or norm not in ("L2", "Linf"):
            raise ValueError(f"unknown attack {attack!r}; known: autoattack-L2, autoattack-Linf, pgd-L2, pgd-Linf")
        scores = {}
        for ep in (attack_eps or {}).get(attack, defaults[norm]):
            if kind == "autoattack":
                xa = autoattack_2afc(encoder, ref[sl], x0[sl], x1[sl], p[sl], ep, norm, n_iter=n_iter, seed=seed)
            else:
                xa = pgd_2afc(encoder, ref[sl], x0[sl], x1[sl], p[sl], ep, norm, steps=n_iter, seed=seed)
            with torch.no_grad():
                ea = torch.cat([encoder.embed(xa[i:i + batch_size].to(encoder.device)).float().cpu()
                                for i in range(0, n_att, batch_size)])
            scores[eps_label(ep)] = twoafc_score(1 - (ea * e0[sl]).sum(1), 1 - (ea * e1[sl]).sum(1), p[sl])
        result["empirical"][attack] = scores
    if attacks:
        result["attacked_n"] = n_att
        result["natural_on_attacked"] = twoafc_score(d0[sl], d1[sl], p[sl])
    return result


def format_table(results: list[dict]) -> str:
    """A Markdown table: one row per encoder; natural, certified and attacked scores in %."""
    cert_keys = list(dict.fromkeys(k for r in results for k in r["certified"]))
    att_cols = [(a, k) for r in results for a, sc in r["empirical"].items() for k in sc]
    att_cols = list(dict.fromkeys(att_cols))
    head = ["encoder", "natural"] + [f"cert {k}" for k in cert_keys] + [f"{a} {k}" for a, k in att_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["encoder"], f"{100 * r['natural']:.1f}"]
        row += [f"{100 * r['certified'][k]:.1f}" if k in r["certified"] else "–" for k in cert_keys]
        row += [f"{100 * r['empirical'][a][k]:.1f}" if k in r["empirical"].get(a, {}) else "–" for a, k in att_cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def evaluate_near_duplicates(encoder, photos, crops_per_photo: int = 4, strength: float = 0.5, radius: float = 0.5,
                             seed: int = 0, batch_size: int = 64) -> dict:
    """Near-duplicate retrieval sanity check: does an edited copy find its original?

    Gallery: each photo (central square) plus `crops_per_photo` random crops, at the encoder's input
    size. Queries: each gallery image after one random everyday edit (`augment.random_edit`, strength
    ≤ `strength`). Reports top-1 accuracy, and, for encoders with a Lipschitz bound, the fraction of
    queries whose correct top-1 is certified (encoder.certify.certify_topk) at ℓ2 `radius` in the
    encoder's input space.
    """
    from .certify import certify_topk
    from .data.augment import center_view, random_edit, random_resized_crop

    g = torch.Generator().manual_seed(seed)
    size = encoder.input_size
    gallery = []
    for img in photos:
        gallery.append(center_view(img, size))
        gallery += [random_resized_crop(img, size, g, scale=(0.1, 0.6)) for _ in range(crops_per_photo)]
    gallery = torch.stack(gallery)
    queries = torch.stack([random_edit(x, g, max_strength=strength, n_max=1) for x in gallery])
    with torch.no_grad():
        eg = torch.cat([encoder.embed(gallery[i:i + batch_size]) for i in range(0, len(gallery), batch_size)]).cpu()
        eq = torch.cat([encoder.embed(queries[i:i + batch_size]) for i in range(0, len(queries), batch_size)]).cpu()
    top1 = (eq @ eg.T).argmax(1)
    correct = top1 == torch.arange(len(gallery))
    out = {"gallery": len(gallery), "edit_strength": strength, "top1": float(correct.float().mean())}
    if encoder.lipschitz is not None:
        cert = [bool(c) and certify_topk(eq[i], eg, 1, encoder.lipschitz).set_radius > radius
                for i, c in enumerate(correct)]
        out[f"certified_top1@{radius:g}"] = float(np.mean(cert))
    return out


def combine_results(parts: dict[str, dict]) -> dict:
    """Size-weighted mean of per-part results (NIGHTS' test = test_imagenet + test_no_imagenet).

    Every score (natural, certified, empirical) is Σ n_part·score_part / Σ n_part, with attacked
    scores weighted by each part's `attacked_n`; the parts are kept under "parts".
    """
    items = list(parts.values())
    n = sum(r["n"] for r in items)
    first = items[0]
    out = {k: first[k] for k in ("encoder", "input_size", "lipschitz", "radius_space")}
    out["n"] = n
    out["natural"] = sum(r["n"] * r["natural"] for r in items) / n
    out["certified"] = {k: sum(r["n"] * r["certified"][k] for r in items) / n for k in first["certified"]}
    out["empirical"] = {}
    na = sum(r.get("attacked_n", 0) for r in items)
    for attack, scores in first["empirical"].items():
        out["empirical"][attack] = {k: sum(r["attacked_n"] * r["empirical"][attack][k] for r in items) / na
                                    for k in scores}
    if na:
        out["attacked_n"] = na
    out["parts"] = parts
    return out
