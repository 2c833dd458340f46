"""Learning-rate schedules as pure functions of the step: factor(step) ∈ [0, 1] times the base lr.

Pure functions (no scheduler object to checkpoint): a resumed run recomputes the same rate.
"""
from __future__ import annotations

import math

__all__ = ["cosine_with_warmup", "triangular"]


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up from 1/warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def triangular(step: int, total: int, peak: float = 0.5) -> float:
    """Linear ramp 0 → 1 over the first `peak` fraction of `total` steps, then linear 1 → 0.

    The first step gets a small positive rate (1/ramp) rather than zero.
    """
    up = max(1, int(round(peak * total)))
    if step < up:
        return (step + 1) / up
    down = max(1, total - up)
    return max(0.0, 1 - (step - up + 1) / down) if step < total - 1 else 1 / down

