"""Decode one image file without trusting it: typed failures with reasons, notes for conversions.

`read_image(path)` reads the file once (size limit), hashes the bytes (SHA-256, the catalog's
content hash), checks the header's pixel count *before* decoding (decompression bombs), decodes the
first frame and returns a loaded PIL image plus what was noticed on the way. Anything wrong raises
`DecodeError(kind, detail)`; `reason` is the one-line text the catalog stores.

Decoding itself (`decode_bytes`, limits, the extension list) lives in encoder/image.py, the one image
vocabulary; this module adds what touches the file system (reading, hashing). Conversions (CMYK,
16-bit, palette, alpha, grayscale, EXIF orientation) are done by `encoder.image.pixels`, which the
encoder's `preprocess` uses, so a gallery image and the same file given as a query go through identical
pixels. `width`/`height` are the displayed size, after EXIF orientation, i.e. the size `preprocess` sees.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field

from PIL import Image

from encoder.image import (IMAGE_EXTENSIONS, DecodeError, DecodeLimits, check_shape, decode_bytes,
                           oriented_size)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeLimits",
    "DecodeError",
    "DecodedImage",
    "read_image",
    "read_bytes",
    "decode_bytes",
    "check_shape",
    "oriented_size",
    "hash_bytes",
]


@dataclass
class DecodedImage:
    """A decoded first frame (pixels loaded, file closed) and what is known about it."""

    image: Image.Image  # loaded; EXIF orientation not yet applied (preprocess applies it)
    width: int  # displayed width, after EXIF orientation
    height: int  # displayed height, after EXIF orientation
    size: int  # file size in bytes
    content_hash: str  # SHA-256 hex of the file's bytes
    format: str | None
    notes: list[str] = field(default_factory=list)  # conversions the encoder's preprocess will apply


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The file's bytes, or DecodeError(missing | permission | not_regular | too_large | unreadable)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DecodeError("not_regular", "not a regular file")
            if st.st_size > max_bytes:
                raise DecodeError("too_large", f"{st.st_size} bytes exceeds the {max_bytes}-byte limit")
            return f.read(max_bytes + 1)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("missing", "file disappeared before it could be read") from None
    except PermissionError:
        raise DecodeError("permission", "permission denied") from None
    except IsADirectoryError:
        raise DecodeError("not_regular", "is a directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DecodeError("symlink_loop", "too many levels of symbolic links") from None
        raise DecodeError("unreadable", exc.strerror or str(exc)) from None


def read_image(path: str | os.PathLike, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Read, hash and decode one image file; every failure is a DecodeError with a reason."""
    data = read_bytes(path, limits.max_bytes)
    digest = hash_bytes(data)
    image, notes, fmt = decode_bytes(data, limits)
    width, height = oriented_size(image)
    try:
        check_shape(width, height, limits)
    except DecodeError:
        image.close()
        raise
    return DecodedImage(image=image, width=width, height=height, size=len(data), content_hash=digest,
                        format=fmt, notes=notes)
