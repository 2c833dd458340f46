"""The differentiable map an attacker sees: image (any size) → float resize → encoder → unit vector.

Attacks perturb the image the user gave, not the encoder's input, so the resize (linear, see
encoder/preprocess.py) sits inside the attacked function, and certificates for that image use the
Lipschitz bound L·‖R‖₂ of the composition.

This module is the one place that decides what an attack perturbs and how it relates to the
certificate: `query_image` makes the tensor (the user's decoded pixels, optionally shrunk) and
`ImageEmbedder.input_norm` its factor ‖R‖₂, taken from the encoder's own `input_norm`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from encoder.preprocess import pil_to_tensor, resize, resize_operator_norm

__all__ = ["ImageEmbedder", "QueryImage", "query_image", "as_embedder", "as_tensor"]


@dataclass
class QueryImage:
    """The tensor a query attack perturbs; radii, ε and ‖δ‖ are all stated over its values."""

    x: torch.Tensor  # (3, H, W) float in [0, 1]
    original_hw: tuple[int, int]  # (H, W) of the decoded image before shrinking
    note: str | None = None  # why x is smaller than the image, when it is


def query_image(image: Image.Image, max_side: int | None = None) -> QueryImage:
    """PIL image → its [0, 1] pixels (encoder.preprocess.pil_to_tensor), shrunk by a float antialiased
    resize (aspect kept) when its longest side exceeds `max_side`."""
    x = pil_to_tensor(image)
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    note = None
    if max_side is not None and max(hw) > max_side:
        f = max_side / max(hw)
        x = resize(x, (max(1, round(hw[0] * f)), max(1, round(hw[1] * f)))).clamp(0, 1)
        note = f"query shrunk from {hw[1]}×{hw[0]} to {x.shape[-1]}×{x.shape[-2]} px before attacking"
    return QueryImage(x.contiguous(), hw, note)


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

    def input_norm(self, image_hw: tuple[int, int]) -> float:
        """‖R‖₂ of the map from an image of size image_hw to the encoder's input: the encoder's own
        `input_norm` (TorchEncoder), else the norm of the float resize this embedder applies."""
        own = getattr(self.encoder, "input_norm", None)
        if own is not None:
            return float(own(tuple(image_hw)))
        return resize_operator_norm(tuple(image_hw), (self.input_size, self.input_size))

    def image_lipschitz(self, image_hw: tuple[int, int]) -> float | None:
        """Bound on ‖e(x) − e(y)‖/‖x − y‖ for images of size image_hw: L·‖R‖₂, or None."""
        if self.lipschitz is None:
            return None
        return float(self.lipschitz) * self.input_norm(image_hw)


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
