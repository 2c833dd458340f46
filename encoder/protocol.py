"""The Encoder protocol every backend offers (DESIGN.md), and a torch base class implementing it.

    embed(x):       x float (B, 3, S, S) in [0, 1], S = input_size → unit-norm (B, dim); differentiable in x
    distance(x, y): 1 − ⟨embed(x), embed(y)⟩  (cosine distance, as DreamSim and LipSim define it)
    lipschitz:      L with ‖embed(x) − embed(y)‖ ≤ L·‖x − y‖ in [0,1] pixel space at input_size, or None
    preprocess(image) → (1, 3, S, S) tensor, a float linear resize of the user's pixels
A module's `forward(a, b)` is the distance, so `model(a, b)` reads like lpips and dreamsim.
"""
from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from .errors import EncoderError
from .preprocess import input_norm, to_input

__all__ = ["Encoder", "TorchEncoder", "EncoderError", "measure_float_error", "FLOAT_ERROR_SAFETY", "full_float32_on_cuda"]


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int
    input_size: int
    lipschitz: float | None
    pretrained: bool  # trained weights (or none needed) vs a random-weight preset: facts, not name substrings

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...


FLOAT_ERROR_SAFETY = 8.0  # measured float error × this = the bound certificates use


def _probe_images(size: int, generator: torch.Generator) -> torch.Tensor:
    """Eight probe inputs (8, 3, size, size) in [0, 1]: constants, noise, a ramp, a checkerboard."""
    ramp = torch.linspace(0, 1, size).view(1, 1, size).expand(3, size, size)
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((ii // 4 + jj // 4) % 2).float().expand(3, size, size)
    noise = torch.rand(3, 3, size, size, generator=generator)
    return torch.stack([torch.zeros(3, size, size), torch.ones(3, size, size), torch.full((3, size, size), 0.5),
                        ramp, checker, *noise])


def measure_float_error(encoder: "TorchEncoder", safety: float = FLOAT_ERROR_SAFETY) -> float:
    """An empirical bound ε on ‖embed(x) − e(x)‖ for the float32 embedding path, e the exact function.

    e is approximated by a float64 copy of the encoder, unfrozen (no folded or fused float32 weights),
    on eight probe inputs (`_probe_images`); the float32 path is run as the gallery runs it (inference
    mode, batch of 8 and batch of 1) and as attacks run it (gradients on). ε = safety × the largest
    difference seen. It is a measurement, not a proof: the safety factor covers inputs the probes miss.
    """
    gen = torch.Generator().manual_seed(0)
    x = _probe_images(encoder.input_size, gen).to(encoder.device)
    ref = copy.deepcopy(encoder)
    if hasattr(ref, "unfreeze"):
        ref.unfreeze()
    ref = ref.double()
    with torch.no_grad():
        exact = ref._embed(x.double())
    del ref
    with torch.inference_mode():
        runs = [encoder.embed(x), encoder.embed(x[:1])]
    with torch.enable_grad():
        runs.append(encoder.embed(x.clone().requires_grad_(True)).detach())
    worst = 0.0
    for out in runs:
        diff = (out.double() - exact[: out.shape[0]]).norm(dim=1).max().item()
        worst = max(worst, diff)
    return safety * max(worst, 1e-12)


def full_float32_on_cuda() -> None:
    """Make CUDA convolutions and matrix products run in full float32, process-wide (TF32 off).

    torch lets cuDNN convolve in TF32 by default (`torch.backends.cudnn.allow_tf32`; a 10-bit mantissa): on an
    H200, lipsim:demo's float error, which certificates subtract as slack, measured 0.010 with it against 1.1e-5
    on the CPU — a slack of 4·ε ≈ 0.04 in score units that erases most certificates (docs/benchmarks.md, "The CUDA
    paths on a GPU"). Embeddings of encoders with a Lipschitz bound therefore switch TF32 off before running on
    CUDA. A global setting, not a context: flags saved and restored around one call would race with another
    thread's call; robret never turns TF32 back on.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class TorchEncoder(nn.Module):
    """Base for torch backends: subclasses set name/dim/input_size/lipschitz and implement `_embed`."""

    name: str = "encoder"
    dim: int = 0
    input_size: int = 0
    lipschitz: float | None = None
    pretrained: bool = False  # backends set True for trained weights (or when none are needed)

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
        x = x.to(self.device, torch.float32)
        if x.is_cuda and self.lipschitz is not None:
            full_float32_on_cuda()
        return self._embed(x)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x, y) = 1 − ⟨e(x), e(y)⟩, shape (B,)."""
        return 1 - (self.embed(x) * self.embed(y)).sum(-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(x, y)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (or encoder.image.Pixels) → (1, 3, input_size, input_size) in [0, 1]
        (EXIF rotation, float channel conversion to RGB, float bilinear resize)."""
        return to_input(image, self.input_size)

    def input_norm(self, image_hw: tuple[int, int], layout: str = "RGB") -> float:
        """Bound on the ℓ2 norm of the preprocessing map from an image's samples (size image_hw, channel
        `layout`, see encoder/image.py) to the encoder's input: c(layout)·‖resize‖₂."""
        return input_norm(tuple(image_hw), self.input_size, layout)

    @property
    def float_error(self) -> float:
        """ε ≥ ‖embed(x) − e(x)‖, the float32 error of the embedding (measured once; see
        `measure_float_error`); certificates subtract a slack derived from it (encoder.certify.slack_for)."""
        cached = self.__dict__.get("_float_error")
        if cached is None:
            cached = measure_float_error(self)
            self.__dict__["_float_error"] = cached
        return cached

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
