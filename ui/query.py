"""Queries for the page: uploads checked before decoding, and the working image searched and attacked.

An upload is refused with a message (never an exception trace) when it is too large in bytes, not an
image, truncated, larger than the pixel limit (decompression bombs), or too small. The query is the
user's image itself: the file's own samples in [0, 1] (retrieval.attacks.query_image, what `robret
query` certifies), so certificates, attack budgets and ‖δ‖ are stated over them and the page states
the same radius as `robret query` and `robret attack`. Only the attack's search runs on a copy whose
longest side is at most `work_side` (retrieval.attacks.WorkingCopy); the page shows shrunk RGB copies.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image


__all__ = ["UploadError", "Query", "decode_upload", "query_pixels", "display_rgb", "to_pil", "png_bytes"]

from encoder.image import to_pil  # noqa: E402  (re-exported: the page's images are its RGB working tensors)


class UploadError(ValueError):
    """An uploaded file cannot be used as a query; the message is shown to the user as is."""


@dataclass
class Query:
    x: torch.Tensor  # (C, H, W) float in [0, 1]: the file's own samples (what radii, ε and ‖δ‖ are over)
    label: str  # what the user picked: "gallery: NAME" or "upload: FILE"
    original_hw: tuple[int, int]  # (H, W) of x
    gallery_id: int | None = None  # set when the query is a gallery image
    png: bytes = b""  # a shrunk RGB copy as PNG, for display
    layout: str = "RGB"  # channels of x (encoder.image.LAYOUT_CHANNELS)
    space: str = ""  # what radii, ε and ‖δ‖ are over, in words (QueryImage.space)


def decode_upload(data: bytes, filename: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes of an uploaded file → a decoded first frame, or UploadError with a readable reason.

    The gallery's own decoder (index.decode) does the checks, so an upload is refused for the same
    reasons a gallery file would be (empty, not an image, truncated, pixel limit, too small, …).
    """
    from index.decode import DecodeError, DecodeLimits, check_shape, decode_bytes, oriented_size

    if len(data) > max_bytes:
        raise UploadError(f"{filename}: {len(data) / 2**20:.1f} MB is over the "
                          f"{max_bytes / 2**20:.0f} MB upload limit")
    limits = DecodeLimits(max_pixels=max_pixels, max_bytes=max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image, _notes, _fmt = decode_bytes(data, limits)
        check_shape(*oriented_size(image), limits)
    except DecodeError as exc:
        raise UploadError(f"{filename}: cannot use this file ({exc.kind.replace('_', ' ')}: {exc.detail})") from None
    return image


def query_pixels(image: Image.Image):
    """PIL image → retrieval.attacks.QueryImage: the file's own samples, as `robret query` reads them."""
    from retrieval.attacks import query_image

    try:
        return query_image(image)
    except (OSError, ValueError) as exc:
        raise UploadError(f"cannot read the image's samples ({exc})") from None


def display_rgb(x: torch.Tensor, layout: str, side: int) -> torch.Tensor:
    """Samples (C, H, W) in `layout` → (3, h, w) RGB with max(h, w) ≤ side, for showing only."""
    from encoder.image import to_rgb
    from encoder.preprocess import resize

    rgb = to_rgb(x, layout)
    h, w = rgb.shape[-2:]
    if max(h, w) > side:
        f = side / max(h, w)
        rgb = resize(rgb, (max(1, round(h * f)), max(1, round(w * f)))).clamp(0, 1)
    return rgb


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
