"""Decode one image file without trusting it: typed failures with reasons, notes for conversions.

`read_image(path)` reads the file once (size limit), hashes the bytes (SHA-256, the catalog's
content hash), checks the header's pixel count *before* decoding (decompression bombs), decodes the
first frame and returns a loaded PIL image plus what was noticed on the way. Anything wrong raises
`DecodeError(kind, detail)`; `reason` is the one-line text the catalog stores.

Conversions (CMYK, 16-bit, palette, alpha, grayscale, EXIF orientation) are *not* done here: the
encoder's own `preprocess` does them (encoder.preprocess.pil_to_tensor), so a gallery image and the
same file given as a query go through identical pixels. `width`/`height` are the displayed size,
after EXIF orientation, i.e. the size `preprocess` sees.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeLimits",
    "DecodeError",
    "DecodedImage",
    "read_image",
    "read_bytes",
    "opened_path",
    "is_inside",
    "decode_bytes",
    "check_shape",
    "oriented_size",
    "hash_bytes",
]

# Extensions that count as images when scanning a folder (compared lower-case).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodeLimits:
    """What a file must satisfy to be embedded. Every refusal names the limit it broke."""

    max_pixels: int = 64_000_000  # width × height above this: refused as a decompression bomb
    max_bytes: int = 512 * 2**20  # files are read into memory once; larger ones are refused
    min_side: int = 8  # shorter side below this (pixels): too small to mean anything
    max_aspect: float = 20.0  # long side / short side above this: squashing it to a square is noise


class DecodeError(ValueError):
    """A file that cannot be embedded. `kind` is a stable code, `detail` the human explanation.

    Kinds: missing, permission, unreadable, not_regular, empty, too_large, not_image, text,
    truncated, corrupt, too_many_pixels, too_small, too_elongated (and, from the folder scan,
    symlink_escape, symlink_broken, symlink_loop).
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


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
    """
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
        chunks, total = [], 0
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


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sniffed window is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(1, len(text))


def decode_bytes(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[Image.Image, list[str], str | None]:
    """Bytes → (loaded first frame, notes, format). Raises DecodeError (see class doc).

    Callers must silence PIL's DecompressionBombWarning themselves (warnings filters are
    process-global; the pixel limit here is checked before any pixel is decoded).
    """
    if not data:
        raise DecodeError("empty", "zero-byte file")
    notes: list[str] = []
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", f"decompression bomb refused by the decoder ({exc})") from None
    except UnidentifiedImageError:
        if _looks_like_text(data[:512]):
            raise DecodeError("text", "a text file, not an image (despite its extension)") from None
        raise DecodeError("not_image", "unrecognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("corrupt", f"unreadable header ({exc})") from None
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise DecodeError("corrupt", f"impossible size {w}×{h}")
        if w * h > limits.max_pixels:
            raise DecodeError("too_many_pixels",
                              f"{w}×{h} = {w * h:,} pixels exceeds the limit of {limits.max_pixels:,} "
                              "(possible decompression bomb)")
        wide_samples = _has_16bit_tiles(im)  # known from the tile descriptors, which load() clears
        n_frames = getattr(im, "n_frames", 1) or 1
        if n_frames > 1:
            im.seek(0)
            notes.append(f"animated ({n_frames} frames): first frame used")
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            msg = str(exc)
            kind = "truncated" if ("truncated" in msg or isinstance(exc, EOFError)) else "corrupt"
            raise DecodeError(kind, f"pixel data could not be decoded ({msg or type(exc).__name__})") from None
        notes.extend(_mode_notes(im, wide_samples))
        fmt = im.format
        frame = im.copy() if n_frames > 1 else im
        if frame is not im:
            im.close()
        return frame, notes, fmt
    except DecodeError:
        im.close()
        raise
    except Exception as exc:  # a decoder bug on hostile input must not abort a build
        im.close()
        raise DecodeError("corrupt", f"decoder failed ({type(exc).__name__}: {exc})") from None


def _has_16bit_tiles(im: Image.Image) -> bool:
    # e.g. a 16-bit RGB PNG: Pillow decodes it as 8-bit RGB with raw mode "RGB;16B".
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        if ";16" in str(args):
            return True
    return False


def _mode_notes(im: Image.Image, wide_samples: bool = False) -> list[str]:
    notes = []
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        notes.append("16-bit samples scaled to [0, 1]")
    elif wide_samples:
        notes.append("16-bit samples reduced to 8 bits by the decoder")
    if im.mode == "F":
        notes.append("floating-point samples scaled to [0, 1]")
    if im.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif im.mode in ("P", "PA"):
        notes.append("palette expanded to RGB")
    elif im.mode in ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I", "F"):
        notes.append("grayscale replicated to RGB")
    elif im.mode in ("YCbCr", "LAB", "HSV"):
        notes.append(f"{im.mode} converted to RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        notes.append("alpha composited onto white")
    orientation = _orientation(im)
    if orientation not in (0, 1):
        notes.append(f"EXIF orientation {orientation} applied")
    return notes


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF: ignored, as exif_transpose would
        return 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without transposing the pixels."""
    w, h = im.size
    return (h, w) if _orientation(im) in _SWAPS_AXES else (w, h)


def check_shape(width: int, height: int, limits: DecodeLimits) -> None:
    """DecodeError(too_small | too_elongated) for images no embedding should be made of."""
    short, long = min(width, height), max(width, height)
    if short < limits.min_side:
        raise DecodeError("too_small", f"{width}×{height} pixels (shorter side below {limits.min_side})")
    if long / short > limits.max_aspect:
        raise DecodeError("too_elongated",
                          f"{width}×{height} pixels (aspect {long / short:.1f}:1 exceeds {limits.max_aspect:g}:1)")


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
