"""Raw pixels as an embedding: the simplest baseline, and an honest 1-Lipschitz one.

    f(x) = [vec(x), 1],  e = f/‖f‖.
vec is an isometry and ‖f‖ ≥ 1 makes the normalisation the projection onto the unit ball, so e is
1-Lipschitz in ℓ2 — certificates apply, which shows that a certificate alone says nothing of
perceptual quality.
"""
from __future__ import annotations

import torch

from .protocol import TorchEncoder
from .registry import register_backend

__all__ = ["PixelsEncoder"]


class PixelsEncoder(TorchEncoder):
    pretrained = True  # nothing is random: no weights at all

    def __init__(self, input_size: int = 32):
        super().__init__()
        self.name = f"pixels:{input_size}" if input_size != 32 else "pixels"
        self.input_size = input_size
        self.dim = 3 * input_size * input_size + 1
        self.lipschitz = 1.0

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.cat([x.flatten(1), torch.ones_like(x[:, :1, 0, 0])], dim=1)
        return f / f.norm(dim=1, keepdim=True)


@register_backend("pixels")  # its specs: registry._builtin_listers
def _load_backend(arg: str, **_) -> PixelsEncoder:
    """`pixels[:<size>]` (encoder.registry); the default input size is 32."""
    if arg and not (arg.isdigit() and int(arg) > 0):
        raise ValueError(f"unknown pixels size {arg!r}: use `pixels` (32 px) or `pixels:<positive size>`, e.g. pixels:64")
    return PixelsEncoder(int(arg) if arg else 32)
