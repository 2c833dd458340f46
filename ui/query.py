"""Queries for the page: uploads checked before decoding, and the working image searched and attacked.

An upload is refused with a message (never an exception trace) when it is too large in bytes, not an
image, truncated, larger than the pixel limit (decompression bombs), or too small. The working image
is the user's image as float RGB in [0, 1], shrunk (float antialiased resize, aspect kept) so that its
longest side is at most `work_side`; certificates and attack budgets are stated in its pixels.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image


__all__ = ["UploadError", "Query", "decode_upload", "working_image", "to_pil", "png_bytes"]

from encoder.image import to_pil  # noqa: E402  (re-exported: the page's images are its RGB working tensors)


class UploadError(ValueError):
    """An uploaded file cannot be used as a query; the message is shown to the user as is."""


@dataclass
class Query:
    x: torch.Tensor  # (3, H, W) float in [0, 1]: the working image
    label: str  # what the user picked: "gallery: NAME" or "upload: FILE"
    original_hw: tuple[int, int]  # the image's size before shrinking to the working size
    gallery_id: int | None = None  # set when the query is a gallery image
    png: bytes = b""  # the working image as PNG, for display


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


def working_image(image: Image.Image, work_side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL image → ((3, H, W) float in [0, 1] with max(H, W) ≤ work_side, original (H, W)), through
    retrieval.attacks.query_image (what every query attack perturbs)."""
    from retrieval.attacks import query_image

    try:
        q = query_image(image, work_side, own_channels=False)  # the page works on (3, H, W) RGB
    except (OSError, ValueError) as exc:
        raise UploadError(f"cannot convert the image to RGB ({exc})") from None
    return q.x, q.original_hw



def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
