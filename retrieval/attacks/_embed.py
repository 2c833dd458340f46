"""The differentiable map an attacker sees: image (any size) → float resize → encoder → unit vector.

Attacks perturb the image the user gave, not the encoder's input, so the resize (linear, see
encoder/preprocess.py) sits inside the attacked function, and certificates for that image use the
Lipschitz bound L·‖R‖₂ of the composition.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from encoder.preprocess import resize, resize_operator_norm

__all__ = ["ImageEmbedder", "as_embedder", "as_tensor"]


class ImageEmbedder:
    """x (B, 3, H, W) in [0, 1] → unit-norm (B, D), differentiable in x, batched to bound memory.

    `encoder` is an Encoder (encoder.protocol) or any callable with the same contract at its own
    input size (then `input_size` must be given, and `lipschitz` if certificates are wanted).
    """

    def __init__(self, encoder, input_size: int | None = None, lipschitz: float | None = None,
                 batch_size: int = 256):
        self.encoder = encoder
        self._embed: Callable[[torch.Tensor], torch.Tensor] = getattr(encoder, "embed", encoder)
        self.input_size = int(input_size if input_size is not None else encoder.input_size)
        self.lipschitz = lipschitz if lipschitz is not None else getattr(encoder, "lipschitz", None)
        self.name = getattr(encoder, "name", "encoder")
        self.batch_size = batch_size
        dev = getattr(encoder, "device", None)
        self.device = dev if isinstance(dev, torch.device) else torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = resize(x, self.input_size)
        if x.shape[0] <= self.batch_size:
            return self._embed(x)
        return torch.cat([self._embed(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings without gradients (for galleries and evaluation)."""
        return self(x).detach()

    def image_lipschitz(self, image_hw: tuple[int, int]) -> float | None:
        """Bound on ‖e(x) − e(y)‖/‖x − y‖ for images of size image_hw: L·‖resize‖₂, or None."""
        if self.lipschitz is None:
            return None
        return float(self.lipschitz) * resize_operator_norm(tuple(image_hw), (self.input_size, self.input_size))


def as_embedder(encoder) -> ImageEmbedder:
    return encoder if isinstance(encoder, ImageEmbedder) else ImageEmbedder(encoder)


def as_tensor(a, device: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    """numpy / tensor → tensor on `device` (gallery vectors may come from FAISS as numpy)."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    t = torch.as_tensor(a)
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device) if device is not None else t
