"""The Encoder protocol every backend offers (DESIGN.md), and a torch base class implementing it.

    embed(x):       x float (B, 3, S, S) in [0, 1], S = input_size → unit-norm (B, dim); differentiable in x
    distance(x, y): 1 − ⟨embed(x), embed(y)⟩  (cosine distance, as DreamSim and LipSim define it)
    lipschitz:      L with ‖embed(x) − embed(y)‖ ≤ L·‖x − y‖ in [0,1] pixel space at input_size, or None
    preprocess(image) → (1, 3, S, S) tensor, a float linear resize of the user's pixels
A module's `forward(a, b)` is the distance, so `model(a, b)` reads like lpips and dreamsim.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from .preprocess import resize_operator_norm, to_input

__all__ = ["Encoder", "TorchEncoder", "EncoderError"]


class EncoderError(RuntimeError):
    """An encoder cannot be built or loaded (missing weights, wrong checkpoint format, …)."""


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int
    input_size: int
    lipschitz: float | None

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...


class TorchEncoder(nn.Module):
    """Base for torch backends: subclasses set name/dim/input_size/lipschitz and implement `_embed`."""

    name: str = "encoder"
    dim: int = 0
    input_size: int = 0
    lipschitz: float | None = None

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm (B, dim) embeddings of float images (B, 3, input_size, input_size) in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} expects (B, 3, {self.input_size}, {self.input_size}) images, got {tuple(x.shape)}"
            )
        return self._embed(x.to(self.device, torch.float32))

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x, y) = 1 − ⟨e(x), e(y)⟩, shape (B,)."""
        return 1 - (self.embed(x) * self.embed(y)).sum(-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(x, y)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image → (1, 3, input_size, input_size) in [0, 1] (EXIF rotation, RGB, float bilinear resize)."""
        return to_input(image, self.input_size)

    def input_norm(self, image_hw: tuple[int, int]) -> float:
        """ℓ2 norm of the preprocessing map from an image of size image_hw to the encoder's input."""
        return resize_operator_norm(tuple(image_hw), (self.input_size, self.input_size))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def info(self) -> dict:
        """What `robret encoder info` prints."""
        return {
            "name": self.name,
            "dim": self.dim,
            "input_size": self.input_size,
            "lipschitz": self.lipschitz,
            "parameters": self.num_params(),
        }
