"""Projected gradient descent in [0, 1] pixel space, ℓ∞ or ℓ2 (Madry et al. 2018).

Every attack (the ranking attacks of retrieval/attacks/, the 2AFC attacks of encoder/evaluate.py) is
"minimise a per-sample objective f(x) over the threat set"

    S(x0) = {x : ‖x − x0‖_p ≤ ε} ∩ [0, 1]^n,   p ∈ {∞, 2},

and this module is the one PGD engine that does it:

    ℓ∞:  x ← Π_S(x − α·sign(∇f(x)))              (robrank's defaults: ε = 8/255, α = 3/255, 32 steps)
    ℓ2:  x ← Π_S(x − α·∇f(x)/‖∇f(x)‖₂)           (α = 2.5·ε/steps unless given)

Π_S projects onto the ball first and clamps to [0, 1] second; since x0 ∈ [0, 1], clamping only
shrinks every coordinate of x − x0, so the result stays inside the ball. The iterate with the lowest
objective is kept per sample (the surrogate can oscillate), and restarts (each from a uniform random
point of the ball) keep the per-sample best.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

__all__ = ["PGDConfig", "PGDOutcome", "ROBRANK_LINF", "pgd", "project", "perturbation_norm", "random_start",
           "canonical_norm", "Objective", "Callback"]

Norm = Literal["linf", "l2"]
_NORMS = {"linf": "linf", "l2": "l2", "Linf": "linf", "L2": "l2", "LINF": "linf"}


def canonical_norm(norm: str) -> Norm:
    """"l2" or "linf" from either spelling ("L2"/"Linf" is pyautoattack's); ValueError otherwise."""
    try:
        return _NORMS[norm]  # type: ignore[return-value]
    except (KeyError, TypeError):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}") from None


@dataclass(frozen=True)
class PGDConfig:
    """How an attack searches its threat set; serialisable with `dataclasses.asdict`."""

    norm: Norm = "linf"  # threat model: "linf" (robrank's) or "l2" (LipSim's certificates)
    eps: float = 8 / 255  # radius of the ball around the clean image, in [0, 1] pixel units
    step: float | None = None  # step size α; None: 3/255 for linf (robrank), 2.5·eps/steps for l2
    steps: int = 32  # gradient steps per restart
    random_start: bool = False  # first restart from a uniform random point of the ball (robrank: off)
    restarts: int = 1  # independent runs; runs after the first always start at random
    stop_at: float | None = None  # end a restart early once every sample's best objective is ≤ this

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", canonical_norm(self.norm))
        if self.eps < 0 or self.steps < 0 or self.restarts < 1:
            raise ValueError("eps and steps must be ≥ 0 and restarts ≥ 1")

    @property
    def step_size(self) -> float:
        if self.step is not None:
            return self.step
        if self.norm == "linf":
            return 3 / 255
        return 2.5 * self.eps / max(self.steps, 1)

    def replace(self, **changes) -> "PGDConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "step": self.step_size}


# robrank's rob224 profile (CUB, CARS, SOP): eps 0.03137, alpha 0.011764, 32 PGD iterations.
ROBRANK_LINF = PGDConfig(norm="linf", eps=8 / 255, step=3 / 255, steps=32)


def perturbation_norm(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample ‖δ‖ (ℓ∞ or ℓ2) of a (B, …) tensor, shape (B,)."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def project(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Π onto {‖x − x0‖ ≤ eps} ∩ [0, 1] (ball first, then the box; see the module doc)."""
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(eps / n, max=1.0).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * factor
    return (x0 + delta).clamp(0.0, 1.0)


def random_start(x0: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None = None):
    """A uniform random point of the ball around x0 (ℓ∞: uniform cube; ℓ2: uniform in the ball)."""
    if norm == "linf":
        u = torch.rand(x0.shape, generator=generator, device="cpu").to(x0) * 2 - 1
        delta = eps * u
    else:
        g = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
        n = x0[0].numel()
        r = torch.rand(x0.shape[0], generator=generator, device="cpu").to(x0) ** (1.0 / n)
        delta = g * (eps * r).view(-1, *([1] * (x0.dim() - 1)))
    return project(x0 + delta, x0, eps, norm)


class PGDOutcome(NamedTuple):
    x_adv: torch.Tensor  # (B, …) the best iterate, inside the threat set
    loss: torch.Tensor  # (B,) objective at x_adv
    clean_loss: torch.Tensor  # (B,) objective at x0 (loss ≤ clean_loss)


Objective = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, float], None]


def pgd(
    x0: torch.Tensor,
    objective: Objective,
    config: PGDConfig = ROBRANK_LINF,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> PGDOutcome:
    """Minimise `objective` (x ↦ per-sample losses, shape (B,)) over the threat set of `config`.

    x0: (B, …) float in [0, 1]. Returns (x_adv, loss, clean_loss): x_adv in the threat set, loss the
    objective there; the clean point counts as an iterate, so loss ≤ clean_loss = objective(x0).
    `callback(step, total_steps, mean_loss)` is called after every step of every restart.
    """
    x0 = x0.detach()
    total = config.restarts * config.steps
    with torch.no_grad():
        clean_loss = objective(x0).detach().float()
    best_loss = clean_loss.clone()
    best_x = x0.clone()
    if config.eps == 0 or config.steps == 0:
        return PGDOutcome(best_x, best_loss, clean_loss)
    alpha = config.step_size
    done = 0
    for restart in range(config.restarts):
        if restart > 0 or config.random_start:
            x = random_start(x0, config.eps, config.norm, generator)
        else:
            x = x0.clone()
        for _ in range(config.steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                loss = objective(x)
                (grad,) = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                loss = loss.detach().float()
                better = loss < best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_x[better] = x.detach()[better]
                if config.norm == "linf":
                    update = grad.sign()
                else:
                    gn = grad.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
                    update = torch.where(gn > 0, grad / gn.clamp_min(1e-30), torch.zeros_like(grad))
                x = project(x.detach() - alpha * update, x0, config.eps, config.norm)
            done += 1
            if callback is not None:
                callback(done, total, float(best_loss.mean()))
            if config.stop_at is not None and bool((best_loss <= config.stop_at).all()):
                break  # every sample has reached its goal (robrank's HM stops on saturation too)
        with torch.no_grad():  # the last iterate has not been scored yet
            loss = objective(x).detach().float()
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_x[better] = x[better]
    if not math.isfinite(float(best_loss.sum())):
        raise FloatingPointError("the attack objective became non-finite")
    return PGDOutcome(best_x, best_loss, clean_loss)
