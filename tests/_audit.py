"""Lipschitz audit tools for the tests: Jacobian spectral norms (power iteration with jvp/vjp, and
exact from the full Jacobian where it is small) and a gradient-ascent search for the pair (x, y)
that maximises ‖f(x) − f(y)‖ / ‖x − y‖ inside the [0, 1] box.

Every function treats the leading dimension as a batch of independent samples (the networks under
test never mix samples), so one call audits many inputs at once.
"""
from __future__ import annotations

import torch

# The audited bound: float32 rounding may exceed an exact 1 by ~1e-6; anything above this is a bug.
TOL = 1e-4


def _bnorm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ℓ2 norm, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def power_iteration_norm(fn, x: torch.Tensor, iters: int = 40, seed: int = 0) -> torch.Tensor:
    """Per-sample σ_max of the Jacobian of `fn` at x: power iteration on JᵀJ, J·v by forward-mode
    AD (torch.func.jvp) and Jᵀ·u by reverse mode (torch.func.vjp). Returns a lower bound that
    converges to σ_max from below (shape (B,))."""
    x = x.detach()
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = v / _bnorm(v)
    _, vjp_fn = torch.func.vjp(fn, x)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype)
    for _ in range(iters):
        _, jv = torch.func.jvp(fn, (x,), (v,))
        sigma = torch.maximum(sigma, jv.flatten(1).norm(dim=1).detach())
        (w,) = vjp_fn(jv)
        v = (w / _bnorm(w).clamp_min(1e-30)).detach()
    return sigma


def exact_jacobian_norm(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-sample σ_max of the full Jacobian (reverse mode, one vjp per output), shape (B,).

    For networks with a small output (LipSim's D+1 coordinates) this is exact and cheap."""
    x = x.detach()
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda z: fn(z)[0], xi, vectorize=True)
        jac = jac.reshape(-1, xi.numel()).double()
        out.append(torch.linalg.matrix_norm(jac, ord=2))
    return torch.stack(out).to(x.dtype)


def max_ratio_search(fn, x: torch.Tensor, y: torch.Tensor, steps: int = 60, lr: float = 0.02):
    """Gradient ascent (Adam) on r(x, y) = ‖fn(x) − fn(y)‖ / ‖x − y‖ over pairs in the [0,1] box.

    Returns (best ratio per pair, x*, y*); every ratio returned is re-evaluated at the returned
    points, so it is a true ratio of the function, not an optimiser artefact."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=lr)
    best = torch.zeros(x.shape[0])
    best_x, best_y = x.detach().clone(), y.detach().clone()
    for _ in range(steps + 1):
        fx, fy = fn(x), fn(y)
        ratio = (fx - fy).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1).clamp_min(1e-12)
        better = ratio.detach() > best
        best = torch.where(better, ratio.detach(), best)
        mask = better.view(-1, *([1] * (x.dim() - 1)))
        best_x = torch.where(mask, x.detach(), best_x)
        best_y = torch.where(mask, y.detach(), best_y)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
            y.clamp_(0, 1)
    return best, best_x, best_y


def hill_climb_jacobian(fn, x: torch.Tensor, rounds: int = 4, scale: float = 0.1, seed: int = 0,
                        norm_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-search ascent of σ_max(J(x)) over x in [0,1] (ReLU networks have piecewise-constant
    Jacobians, so gradients in x say nothing): keep each sample's perturbation when it raises the
    norm. Returns (best norm per sample, best x)."""
    norm_fn = norm_fn or (lambda z: power_iteration_norm(fn, z, iters=25))
    gen = torch.Generator().manual_seed(seed)
    best_x = x.detach().clone()
    best = norm_fn(best_x)
    for r in range(rounds):
        cand = (best_x + scale * (0.5**r) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        n = norm_fn(cand)
        better = n > best
        best = torch.where(better, n, best)
        best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best_x)
    return best, best_x

