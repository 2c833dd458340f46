"""The encoder's resize as a linear map, in numpy: its matrices, its exact norm, and its application to an
image too large to hold as floats. Nothing here needs torch.

The resize of the certified path (DESIGN.md, "Certificates") is the antialiased bilinear resize, separable:
    R(X)_c = R_h · X_c · R_wᵀ  for every channel c,
with R_h = `resize_matrix(H, S)` and R_w = `resize_matrix(W, S)`. `encoder.preprocess.resize` runs the same
map with torch's kernel (differentiable, for attacks and ordinary images); tests check that both agree.

Why numpy: `robret query` reduces a query file to the encoder's input (`reduce_to_input`) and frees the
decoder's image *before* torch and FAISS are loaded, so that the process's peak memory is the larger of
"decoded image" and "libraries + model", not their sum (benchmarks/decode_memory.py).
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from .image import Pixels, channel_lipschitz, pixels, to_rgb

__all__ = ["resize_matrix", "resize_operator_norm", "input_norm", "reduce_to_input", "banded", "BAND_PIXELS"]

BAND_PIXELS = 1 << 20  # larger images are converted and resized in bands of rows (bounded memory)
_BLOCK = 32  # output columns per matrix product in `_matmul_banded`


@functools.lru_cache(maxsize=256)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of the 1-D antialiased bilinear resize (torch's `F.interpolate(...,
    mode="bilinear", antialias=True, align_corners=False)`, the same filter as Pillow's BILINEAR).

    With scale s = n_in / n_out, output i is centred at c_i = s·(i + ½) in input coordinates and takes the
    inputs j in [⌊c_i − σ + ½⌋, ⌊c_i + σ + ½⌋) ∩ [0, n_in), σ = max(s, 1) (the support), with weights
        w_ij ∝ max(0, 1 − |(j − c_i + ½) / max(s, 1)|),   normalised to Σ_j w_ij = 1
    (a triangle filter stretched over s inputs when shrinking: the antialiasing). Equal sizes: the identity
    (`resize` does not resample then). tests/test_preprocess.py checks it against torch's kernel.
    """
    if n_in == n_out:
        return np.eye(n_in)
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # int64 truncation, as the kernel's
    hi = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    j = lo[:, None] + np.arange(int((hi - lo).max()))  # (n_out, taps): each output's window, built alone
    w = np.clip(1.0 - np.abs((j - centre[:, None] + 0.5) / support), 0.0, None) * (j < hi[:, None])
    total = w.sum(axis=1, keepdims=True)
    np.divide(w, total, out=w, where=total != 0)
    matrix = np.zeros((n_out, n_in))
    inside = j < hi[:, None]
    matrix[np.nonzero(inside)[0], j[inside]] = w[inside]
    return matrix


@functools.lru_cache(maxsize=256)
def resize_operator_norm(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
    """Exact ℓ2 operator norm of the resize from in_hw to out_hw: σ_max(R_h)·σ_max(R_w).

    Rounded up by a relative 1e-5: the resize actually run is float32, whose rounded weights make a
    slightly different linear map (its norm measured up to ~1e-6 above the float64 one per axis), and
    float error must only ever shrink the certified radius.
    """
    if tuple(in_hw) == tuple(out_hw):
        return 1.0
    sh = np.linalg.norm(resize_matrix(in_hw[0], out_hw[0]), 2)
    sw = np.linalg.norm(resize_matrix(in_hw[1], out_hw[1]), 2)
    return float(sh * sw) * (1 + 1e-5)


def input_norm(image_hw: tuple[int, int], size: int, layout: str = "RGB") -> float:
    """Upper bound on the ℓ2 operator norm of the map from an image's samples (size image_hw, channel
    `layout`) to the encoder input (`encoder.preprocess.samples_to_input`):

        ‖R ∘ Φ‖ ≤ ‖R‖₂ · c(layout),

    with ‖R‖₂ the exact norm of the resize (`resize_operator_norm`) and c the Lipschitz constant of the
    per-pixel channel conversion (`encoder.image.channel_lipschitz`; 1 for RGB).
    """
    return resize_operator_norm(tuple(image_hw), (size, size)) * channel_lipschitz(layout)


def banded(hw: tuple[int, int]) -> bool:
    """True when an image of hw = (height, width) is reduced in bands (`reduce_to_input`): above BAND_PIXELS."""
    return hw[0] * hw[1] > BAND_PIXELS


@functools.lru_cache(maxsize=16)
def _blocks(n_in: int, n_out: int) -> tuple[np.ndarray, tuple[tuple[int, int, int, int], ...]]:
    """float32 R_wᵀ (n_in, n_out) and, per block of `_BLOCK` output columns, the rows where it is nonzero
    (a resize matrix is banded: output j reads only the inputs near s·j)."""
    mt = np.ascontiguousarray(resize_matrix(n_in, n_out).T, dtype=np.float32)
    spans = []
    for j0 in range(0, n_out, _BLOCK):
        j1 = min(n_out, j0 + _BLOCK)
        rows = np.flatnonzero(mt[:, j0:j1].any(axis=1))
        spans.append((j0, j1, int(rows[0]) if len(rows) else 0, int(rows[-1]) + 1 if len(rows) else 0))
    return mt, tuple(spans)


def _matmul_banded(x: np.ndarray, n_out: int, out: np.ndarray) -> None:
    """out = x @ R_wᵀ (float32) for x (..., n_in): the product with the resize matrix, block by block of
    output columns over the input columns each block reads (the other entries are zero)."""
    mt, spans = _blocks(x.shape[-1], n_out)
    for j0, j1, r0, r1 in spans:
        np.matmul(x[..., r0:r1], mt[r0:r1, j0:j1], out=out[..., j0:j1])


def reduce_to_input(image: Image.Image | Pixels, size: int) -> np.ndarray:
    """A decoded image (or its `Pixels`) → the encoder's input (3, size, size) float32 in [0, 1], in numpy.

    The certified map R∘Φ (`encoder.image`, module docstring): bands of rows of the file's samples are
    converted to RGB (Φ acts on every pixel alone) and resized along their width (X·R_wᵀ), then the
    stacked (3, H, size) result along its height (R_h·Y); R_h·(X·R_wᵀ) = R(X) because the resize is
    separable. Memory: one band of BAND_PIXELS samples as floats plus the (3, H, size) intermediate, never
    a float copy of the image; 8-bit samples are read from the decoder's image band by band.
    `encoder.preprocess.to_input` uses this for images above BAND_PIXELS, so a query reduced early and the
    same image preprocessed by the encoder give the same input, bit for bit in one process (another process
    may run BLAS with other threads and sum in another order: the same input to float32 rounding).
    """
    px = pixels(image)
    h, w = px.size
    rows = max(1, BAND_PIXELS // w)
    wide = np.empty((3, h, size), dtype=np.float32)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        band = to_rgb(px.samples_rows(r0, r1), px.layout)
        _matmul_banded(band, size, wide[:, r0:r1])
        del band  # before the next band is made: one band's floats at a time
    if h == size:
        return wide
    out = np.empty((3, size, size), dtype=np.float32)
    _matmul_banded(wide.swapaxes(1, 2), size, out.swapaxes(1, 2))  # R_h·Y = (Yᵀ·R_hᵀ)ᵀ
    return out
