"""From a PIL image to the encoder's input, as a linear map whose ℓ2 norm is known exactly.

Certificates must be stated for the image the user gave, so the steps between the file's own samples
(floats in [0,1], after EXIF rotation; see encoder/image.py) and the encoder are a per-pixel float
channel conversion to RGB (Lipschitz constant c per layout, encoder/image.py) and an antialiased
bilinear resize done in floating point. That resize is linear and separable:
    R(X)_c = R_h · X_c · R_wᵀ  for every channel c,
so ‖R‖₂ = σ_max(R_h)·σ_max(R_w), computed exactly from the two small matrices (no power-iteration
underestimate) and cached per size pair. A radius r at the encoder's input is a radius r/‖R‖₂ in the
user's image: ‖e(R(x+δ)) − e(Rx)‖ ≤ L·‖Rδ‖ ≤ L·‖R‖₂·‖δ‖; with the channel conversion Φ in front,
a radius r at the encoder's input is r/(c·‖R‖₂) over the file's samples (`input_norm`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .image import Pixels, pixels, to_rgb
from .resize import banded, input_norm, reduce_to_input, resize_matrix, resize_operator_norm

__all__ = ["pil_to_tensor", "resize", "resize_matrix", "resize_operator_norm", "to_input", "samples_to_input",
           "input_norm"]


def pil_to_tensor(image: Image.Image | Pixels) -> torch.Tensor:
    """PIL image (any mode) → float32 (3, H, W) RGB in [0, 1], through the file's own samples.

    EXIF orientation applied, alpha composited onto white in float, 16-bit samples scaled by their bit
    depth (encoder/image.py, `pixels` and `to_rgb`).
    """
    return torch.from_numpy(pixels(image).rgb())


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of float (B, C, H, W) or (C, H, W) to `size`; linear in x."""
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    squeeze = x.dim() == 3
    if squeeze:
        x = x[None]
    if tuple(x.shape[-2:]) != out_hw:
        x = F.interpolate(x, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
    return x[0] if squeeze else x


def to_input(image: Image.Image | Pixels, size: int) -> torch.Tensor:
    """PIL image (or its Pixels) → (1, 3, size, size) float tensor in [0, 1]: `pil_to_tensor`, then `resize`.

    Images above `encoder.resize.BAND_PIXELS` go through `encoder.resize.reduce_to_input`: the same linear map applied as
    products with its matrices, in bands of rows, without a float copy of the whole image (a 64-megapixel
    RGB file would need 768 MB for it) and, for 8-bit images, without an integer copy either. It needs no
    torch, which lets `robret query` reduce a large query before loading torch, to the same input.
    """
    px = pixels(image)
    if banded(px.size):
        return torch.from_numpy(reduce_to_input(px, size))[None]
    return resize(torch.from_numpy(px.rgb()), size)[None]


def samples_to_input(samples: torch.Tensor, layout: str, size: int) -> torch.Tensor:
    """File samples (B, C, H, W) in `layout` → encoder input (B, 3, size, size); differentiable.

    The whole certified map of a query: per-pixel channel conversion (`to_rgb`), then the float resize.
    Its Lipschitz constant is at most `input_norm((H, W), size, layout)`.
    """
    return resize(to_rgb(samples, layout), size)
