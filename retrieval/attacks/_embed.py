"""The differentiable map an attacker sees: file samples (any size, the file's own channels) → float
channel conversion to RGB (encoder.image.to_rgb) → float resize → encoder → unit vector.

Attacks perturb the image the user gave, not the encoder's input, so the resize (linear, see
encoder/preprocess.py) sits inside the attacked function, and certificates for that image use the
Lipschitz bound L·‖R‖₂ of the composition.

This module is the one place that decides what an attack perturbs and how it relates to the
certificate: `query_image` makes the tensor (the file's own samples, optionally shrunk) and
`ImageEmbedder.input_norm` its factor c·‖R‖₂ (channel conversion × resize), taken from the encoder's own
`input_norm`. A query whose decode is not continuous in its samples (encoder.image.Pixels.uncertified)
is attacked in RGB, and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from encoder.attack import project
from encoder.image import LAYOUT_CHANNELS, channel_lipschitz, pixels, to_rgb
from encoder.preprocess import resize, resize_matrix, resize_operator_norm

__all__ = ["ImageEmbedder", "QueryImage", "query_image", "WorkingCopy", "working_copy", "as_embedder", "as_tensor"]


@dataclass
class QueryImage:
    """The tensor a query attack perturbs; radii, ε and ‖δ‖ are all stated over its values."""

    x: torch.Tensor  # (C, H, W) float in [0, 1]: the file's samples in `layout`'s channels
    original_hw: tuple[int, int]  # (H, W) of the decoded image before shrinking
    note: str | None = None  # why x is smaller than the image, when it is
    layout: str = "RGB"  # channels of x (encoder.image.LAYOUT_CHANNELS)
    uncertified: str | None = None  # why the file's own samples cannot be certified (then x is its RGB)

    @property
    def space(self) -> str:
        """What radii, ε and ‖δ‖ are over, in words."""
        c = LAYOUT_CHANNELS[self.layout]
        what = "the file's own samples" if self.uncertified is None else "the file's pixels converted to RGB"
        return f"{what} ({self.layout}, {c}-channel, {self.x.shape[-1]}×{self.x.shape[-2]}) in [0,1]"


def query_image(image: Image.Image, max_side: int | None = None, own_channels: bool = True) -> QueryImage:
    """PIL image → its samples in [0, 1] (encoder.image.pixels: the file's own channels, or RGB with
    own_channels=False or when its decode cannot be certified), shrunk by a float antialiased resize
    (aspect kept, each channel alike) when its longest side exceeds `max_side`."""
    px = pixels(image)
    if own_channels and px.uncertified is None:
        x, layout = torch.from_numpy(px.samples), px.layout
    else:
        x, layout = torch.from_numpy(px.rgb()), "RGB"
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    note = None
    if max_side is not None and max(hw) > max_side:
        f = max_side / max(hw)
        x = resize(x, (max(1, round(hw[0] * f)), max(1, round(hw[1] * f)))).clamp(0, 1)
        note = f"query shrunk from {hw[1]}×{hw[0]} to {x.shape[-1]}×{x.shape[-2]} px before attacking"
    return QueryImage(x.contiguous(), hw, note, layout, px.uncertified)


@dataclass
class WorkingCopy:
    """A shrunk copy of a query that an attack optimises on for speed, and the way back to the original.

    With S the float antialiased shrink from the original size (H, W) to (h, w) and U the float resize
    back (both linear, separable: U = U_h ⊗ U_w on every channel), the attack searches η on the copy
    S·x and the original receives δ = Π(U·η), Π the exact projection onto the threat set
    {‖δ‖ ≤ ε} ∩ {x + δ ∈ [0, 1]} (encoder.attack.project). The copy's budgets are
        ℓ2:  ε_w = ε / ‖U‖₂,   ‖U‖₂ = σ_max(U_h)·σ_max(U_w)      (resize_operator_norm, exact),
        ℓ∞:  ε_w = ε / ‖U‖∞,   ‖U‖∞ = ‖U_h‖∞·‖U_w‖∞              (largest absolute row sums; for a
                                                                  Kronecker product they multiply),
    so that ‖U·η‖ ≤ ‖U‖·‖η‖ ≤ ε before Π: Π then only corrects float rounding and the [0, 1] box.
    Every number reported (‖δ‖, the rankings, the certificate) is computed on the original x and
    x + δ, through the same map as `robret query`: the copy only steers the search.
    """

    x: torch.Tensor  # (1, C, h, w) the shrunk copy S·x
    original_hw: tuple[int, int]  # (H, W)
    up_l2: float  # ‖U‖₂ (rounded up)
    up_linf: float  # ‖U‖∞ (rounded up)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.x.shape[-2]), int(self.x.shape[-1])

    def budget(self, norm: str, eps: float) -> float:
        """The copy's budget ε_w for the original's ε (class doc)."""
        return eps / (self.up_l2 if norm == "l2" else self.up_linf)

    def lift(self, x: torch.Tensor, x_adv_copy: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
        """x + Π(U·(x_adv_copy − S·x)): the original image perturbed as the copy was, inside the threat set."""
        delta = resize(x_adv_copy.to(x.dtype) - self.x.to(x.dtype), self.original_hw)
        return project(x + delta, x, eps, norm)

    def describe(self) -> str:
        h, w = self.hw
        return (f"the attack searched on a {w}×{h} copy of the {self.original_hw[1]}×{self.original_hw[0]} query "
                f"(for speed); ‖δ‖, rankings and the certificate are for the original image")


def working_copy(x: torch.Tensor, max_side: int | None) -> WorkingCopy | None:
    """The WorkingCopy of a (1, C, H, W) query when its longest side exceeds `max_side` (aspect kept), else None."""
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    if max_side is None or max(hw) <= max_side:
        return None
    f = max_side / max(hw)
    small = (max(1, round(hw[0] * f)), max(1, round(hw[1] * f)))
    up_l2 = resize_operator_norm(small, hw)
    up_linf = float(np.prod([np.abs(resize_matrix(a, b)).sum(1).max() for a, b in zip(small, hw)])) * (1 + 1e-5)
    return WorkingCopy(resize(x, small).clamp(0, 1), hw, up_l2, up_linf)


class ImageEmbedder:
    """x (B, C, H, W) in [0, 1] in `layout`'s channels → unit-norm (B, D), differentiable in x, batched.

    `encoder` is an Encoder (encoder.protocol) or any callable with the same contract at its own
    input size (then `input_size` must be given, and `lipschitz` if certificates are wanted).
    `layout`: the channels of the images it is given (default RGB; see encoder.image.to_rgb).
    """

    def __init__(self, encoder, input_size: int | None = None, lipschitz: float | None = None,
                 batch_size: int = 256, layout: str = "RGB"):
        self.encoder = encoder
        self.layout = layout
        self._embed: Callable[[torch.Tensor], torch.Tensor] = getattr(encoder, "embed", encoder)
        self.input_size = int(input_size if input_size is not None else encoder.input_size)
        self.lipschitz = lipschitz if lipschitz is not None else getattr(encoder, "lipschitz", None)
        self.name = getattr(encoder, "name", "encoder")
        self.batch_size = batch_size
        dev = getattr(encoder, "device", None)
        self.device = dev if isinstance(dev, torch.device) else torch.device("cpu")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in this embedder's layout → the encoder's input (B, 3, S, S): to_rgb, then the float resize."""
        x = x.to(self.device, torch.float32)
        if self.layout != "RGB":
            x = to_rgb(x, self.layout)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = resize(x, self.input_size)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if x.shape[0] <= self.batch_size:
            return self._embed(x)
        return torch.cat([self._embed(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings without gradients, through the gallery's own embedding path
        (index.embedder.embed_inputs: inference mode, the encoder's fastest kernels) for Encoders."""
        if not hasattr(self.encoder, "embed"):
            return self(x).detach()
        from index.embedder import embed_inputs

        x = self._prepare(x)
        parts = [torch.from_numpy(embed_inputs(self.encoder, [x[i:i + self.batch_size]]))
                 for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts).to(self.device)

    def input_norm(self, image_hw: tuple[int, int]) -> float:
        """c·‖R‖₂, the norm bound of the map from an image of size image_hw (in this embedder's layout)
        to the encoder's input: the encoder's own `input_norm` (TorchEncoder), else the same product
        for the float conversion and resize this embedder applies."""
        own = getattr(self.encoder, "input_norm", None)
        if own is not None:
            return float(own(tuple(image_hw), self.layout))
        return resize_operator_norm(tuple(image_hw), (self.input_size, self.input_size)) * channel_lipschitz(self.layout)

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
