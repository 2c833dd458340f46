"""A small ℓ2 PGD for the soundness tests (Madry et al. 2018): normalised-gradient ascent steps,
projection onto the ℓ2 ball of radius ε, then onto the [0,1] box, several restarts in one batch.

Projecting onto the ball and then clamping to the box keeps both constraints: for x in [0,1],
clamping x + δ shrinks every |δ_i|, so ‖δ‖ stays ≤ ε.
"""
from __future__ import annotations

import numpy as np
import torch


def _bnorm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def pgd_l2(objective, x: torch.Tensor, eps: torch.Tensor, steps: int = 60, restarts: int = 4,
           step_scale: float = 2.5, seed: int = 0):
    """Maximise `objective(x_adv, case)` (shape (N,)) over ‖x_adv − x_case‖₂ ≤ eps_case, x_adv ∈ [0,1].

    x: (B, ...) clean inputs; eps: (B,) radii; `case` is a LongTensor telling which of the B cases each
    of the N = restarts·B rows belongs to (rows are restart-major). Restart 0 starts at x, the others
    at a random point of the ball. Step size step_scale·ε/steps (Madry's 2.5·ε/steps).
    Returns (best objective (B,), best x_adv (B, ...)): the best over steps and restarts, evaluated
    at the returned points.
    """
    b = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    case = torch.arange(b).repeat(restarts)
    x0 = x.detach().repeat(restarts, *([1] * (x.dim() - 1)))
    e = eps.detach().to(x.dtype).repeat(restarts).view(-1, *([1] * (x.dim() - 1)))
    delta = torch.randn(x0.shape, generator=gen, dtype=x.dtype)
    delta = delta / _bnorm(delta) * e * torch.rand(x0.shape[0], generator=gen).view_as(e) ** (1 / 8)
    delta[:b] = 0
    delta = ((x0 + delta).clamp(0, 1) - x0)
    alpha = step_scale * e / steps
    best = torch.full((x0.shape[0],), -torch.inf, dtype=x.dtype)
    best_x = x0.clone()
    for it in range(steps + 1):
        delta.requires_grad_(True)
        obj = objective(x0 + delta, case)
        with torch.no_grad():
            better = obj > best
            best = torch.where(better, obj, best)
            best_x[better] = (x0 + delta)[better]
        if it == steps:
            break
        (grad,) = torch.autograd.grad(obj.sum(), delta)
        with torch.no_grad():
            delta = delta + alpha * grad / _bnorm(grad).clamp_min(1e-20)
            delta = delta * torch.clamp(e / _bnorm(delta).clamp_min(1e-20), max=1.0)
            delta = (x0 + delta).clamp(0, 1) - x0
    # x0 + δ is rounded to x's dtype (≤ ½ ulp ≤ eps/2 a component in [0, 1]) and so is its difference with x0:
    # ‖best_x − x0‖ ≤ ‖δ‖ + eps·√n, n components — above a fixed 1e-7 for float32 images and tiny radii.
    rounding = torch.finfo(x.dtype).eps * x0[0].numel() ** 0.5
    assert torch.all(_bnorm(best_x - x0) <= e * (1 + 1e-5) + rounding), "PGD left its ball"
    best, idx = best.view(restarts, b).max(0)
    rows = idx * b + torch.arange(b)
    return best, best_x[rows]


def attack_certified_sets(gallery, found, steps: int = 40, restarts: int = 3) -> torch.Tensor:
    """PGD against certified top-k sets of the 2-Lipschitz "encoder" e(x) = 2x − 1 on [0,1]^D, whose clean
    input (q + 1)/2 maps to each query q: maximise max_{j ∉ top} s_j − min_{i ∈ top} s_i (> 0 iff some outsider
    beats some member) within (1 − 1e-6) of each set radius, over the whole gallery's exact ranking.
    gallery (N, D); found [(q (D,), a search result with `.ids` and `.cert.set_radius`)], those with a positive
    radius attacked. Returns the best objective per attacked case (all < 0 when every set held; empty if none)."""
    found = [(q, got) for q, got in found if got.cert.set_radius > 0]
    if not found:
        return torch.zeros(0, dtype=torch.float64)
    gal = torch.as_tensor(np.asarray(gallery, np.float64))
    cases = torch.stack([(torch.as_tensor(np.asarray(q, np.float64)) + 1) / 2 for q, _ in found])
    radii = torch.tensor([got.cert.set_radius * (1 - 1e-6) for _, got in found], dtype=torch.float64)
    inside = torch.zeros(len(found), len(gal), dtype=torch.bool)
    for b, (_, got) in enumerate(found):
        inside[b, torch.as_tensor(got.ids)] = True

    def objective(xa, case):
        s = (2 * xa - 1) @ gal.T
        mask = inside[case]
        return s.masked_fill(mask, -torch.inf).max(1).values - s.masked_fill(~mask, torch.inf).min(1).values

    best, _ = pgd_l2(objective, cases, radii, steps=steps, restarts=restarts)
    return best
