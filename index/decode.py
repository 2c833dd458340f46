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

from encoder.image import (IMAGE_EXTENSIONS, DecodeError, DecodeLimits, check_header, check_shape,
                           decode_bytes, oriented_size)
from .remote import is_remote, read_object

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeLimits",
    "DecodeError",
    "DecodedImage",
    "read_image",
    "decode_image",
    "read_bytes",
    "opened_path",
    "is_inside",
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


def read_bytes(path: str | os.PathLike | bytes, max_bytes: int,
               root: str | os.PathLike | bytes | None = None) -> bytes:
    """The file's bytes, or DecodeError(missing | permission | not_regular | too_large | unreadable |
    symlink_loop | symlink_escape).

    Nothing is trusted between a check and the read: the path is opened once, with O_NONBLOCK (a
    FIFO or a device cannot block the open) and O_NOCTTY, and every check is made on the opened
    descriptor — `fstat` refuses anything that is not a regular file before a byte is read, and with
    `root` the file actually opened must lie inside the real `root` (resolved from the descriptor),
    so a symlink or directory swapped in after a scan cannot lead outside the gallery. Symlinks are
    followed (O_NOFOLLOW does not fit: links inside the root are part of a gallery), which is why
    confinement is checked on the descriptor.

    An `s3://` or `gs://` URI is read by `index.remote.read_object` (confined to a `root` URI, size
    asked before the body is read).
    """
    if is_remote(path):
        return read_object(path, max_bytes, root)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
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
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError("not_regular", "not a regular file (directory, device, FIFO or socket)")
        if root is not None:
            _check_confined(fd, st, path, root)
        if st.st_size > max_bytes:
            raise DecodeError("too_large", f"{st.st_size} bytes exceeds the {max_bytes}-byte limit")
        head = os.read(fd, min(1 << 16, max_bytes + 1))
        check_header(head)  # a large non-image file is refused before its body is read
        chunks, total = [head], len(head)
        while block := os.read(fd, min(1 << 24, max_bytes + 1 - total)):
            chunks.append(block)
            total += len(block)
            if total > max_bytes:  # grew since fstat
                raise DecodeError("too_large", f"more than {max_bytes} bytes (the limit)")
        return b"".join(chunks)
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def opened_path(fd: int, st: os.stat_result, path: str | os.PathLike | bytes) -> bytes | None:
    """The real path of the file open as `fd` (bytes), or None when it cannot be established.

    Linux names it in /proc/self/fd; elsewhere the resolved `path` counts only if it is the same
    file (device and inode) as the descriptor.
    """
    try:
        target = os.readlink(b"/proc/self/fd/%d" % fd)
        if not target.endswith(b" (deleted)"):
            return target
        return None
    except OSError:
        pass
    try:
        resolved = os.path.realpath(os.fsencode(path))
        same = os.stat(resolved)
    except OSError:
        return None
    return resolved if (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino) else None


def is_inside(path: bytes, root: bytes) -> bool:
    """`path` is `root` or below it (both absolute, already resolved)."""
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _check_confined(fd: int, st: os.stat_result, path, root) -> None:
    real_root = os.path.realpath(os.fsencode(root))
    real = opened_path(fd, st, path)
    if real is None:
        raise DecodeError("unreadable", "could not establish which file was opened")
    if not is_inside(real, real_root):
        raise DecodeError("symlink_escape", f"resolves outside the indexed folder (→ {os.fsdecode(real)})")


def read_image(path: str | os.PathLike, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Read, hash and decode one image file; every failure is a DecodeError with a reason."""
    return decode_image(read_bytes(path, limits.max_bytes), limits)


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Hash and decode a file's bytes (`read_bytes`), checking its shape; every failure is a DecodeError.
    Lets a caller size its decode memory (`encoder.image.decode_cost`) between reading and decoding."""
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
