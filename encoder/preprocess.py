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

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .image import Pixels, channel_lipschitz, pixels, to_rgb

__all__ = ["pil_to_tensor", "resize", "resize_matrix", "resize_operator_norm", "to_input", "samples_to_input",
           "input_norm"]


def pil_to_tensor(image: Image.Image | Pixels) -> torch.Tensor:
    """PIL image (any mode) → float32 (3, H, W) RGB in [0, 1], through the file's own samples.

    EXIF orientation applied, alpha composited onto white in float, 16-bit samples scaled by their bit
    depth (encoder/image.py, `pixels` and `to_rgb`).
    """
    return pixels(image).rgb()


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of float (B, C, H, W) or (C, H, W) to `size`; linear in x."""
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    squeeze = x.dim() == 3
    if squeeze:
        x = x[None]
    if tuple(x.shape[-2:]) != out_hw:
        x = F.interpolate(x, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
    return x[0] if squeeze else x


@functools.lru_cache(maxsize=256)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of the 1-D antialiased bilinear resize used by `resize`.

    Obtained by resizing the identity, in chunks so that large images stay cheap.
    """
    if n_in == n_out:
        return np.eye(n_in)
    # Resize images whose columns are identity columns, with the width unchanged. (Resizing an
    # (n_in, 1) strip instead is wrong in torch's antialiased kernel: every output row comes out
    # equal to the first.)
    cols = []
    for start in range(0, n_in, 128):  # 128 identity columns at a time: 8 MB of float64 for 8000 rows
        stop = min(n_in, start + 128)
        # A last chunk one column wide would hit that same bug (n_in = 513, 1025, …): pad it with a
        # zero column and drop the column again.
        width = max(stop - start, 2)
        eye = torch.zeros(1, 1, n_in, width, dtype=torch.float64)
        eye[0, 0, torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        out = F.interpolate(eye, size=(n_out, width), mode="bilinear", antialias=True,
                            align_corners=False)
        cols.append(out[0, 0, :, : stop - start].numpy())
    return np.concatenate(cols, axis=1)


@functools.lru_cache(maxsize=256)
def resize_operator_norm(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
    """Exact ℓ2 operator norm of `resize` from in_hw to out_hw: σ_max(R_h)·σ_max(R_w).

    Rounded up by a relative 1e-5: the resize actually run is float32, whose rounded weights make a
    slightly different linear map (its norm measured up to ~1e-6 above the float64 one per axis), and
    float error must only ever shrink the certified radius.
    """
    if tuple(in_hw) == tuple(out_hw):
        return 1.0
    sh = np.linalg.norm(resize_matrix(in_hw[0], out_hw[0]), 2)
    sw = np.linalg.norm(resize_matrix(in_hw[1], out_hw[1]), 2)
    return float(sh * sw) * (1 + 1e-5)


BAND_PIXELS = 1 << 20  # larger images are converted and resized in bands of rows (bounded memory)


def to_input(image: Image.Image | Pixels, size: int) -> torch.Tensor:
    """PIL image (or its Pixels) → (1, 3, size, size) float tensor in [0, 1]: `pil_to_tensor`, then `resize`.

    Images above BAND_PIXELS are converted and resized in bands of rows: the resize is separable
    (R(X) = R_h·X·R_wᵀ) and the channel conversion is per pixel, so each band is converted and resized
    along its width alone (its height unchanged: the identity), and the stacked result along the height.
    The same linear map, computed without a float copy of the whole image (a 64-megapixel RGB file
    would need 768 MB for it), and, for 8-bit images, without an integer copy either: each band's samples
    are read from the decoder's image (`Pixels.raw_rows`).
    """
    px = pixels(image)
    h, w = px.size
    if h * w <= BAND_PIXELS:
        return resize(px.rgb(), size)[None]
    rows = max(1, BAND_PIXELS // w)
    bands = [resize(px.rgb_rows(r0, min(h, r0 + rows)), (min(h, r0 + rows) - r0, size)) for r0 in range(0, h, rows)]
    return resize(torch.cat(bands, dim=1), size)[None]


def samples_to_input(samples: torch.Tensor, layout: str, size: int) -> torch.Tensor:
    """File samples (B, C, H, W) in `layout` → encoder input (B, 3, size, size); differentiable.

    The whole certified map of a query: per-pixel channel conversion (`to_rgb`), then the float resize.
    Its Lipschitz constant is at most `input_norm((H, W), size, layout)`.
    """
    return resize(to_rgb(samples, layout), size)


def input_norm(image_hw: tuple[int, int], size: int, layout: str = "RGB") -> float:
    """Upper bound on the ℓ2 operator norm of `samples_to_input` for an image of size image_hw:

        ‖R ∘ Φ‖ ≤ ‖R‖₂ · c(layout),

    with ‖R‖₂ the exact norm of the resize (`resize_operator_norm`) and c the Lipschitz constant of the
    per-pixel channel conversion (`encoder.image.channel_lipschitz`; 1 for RGB).
    """
    return resize_operator_norm(tuple(image_hw), (size, size)) * channel_lipschitz(layout)
