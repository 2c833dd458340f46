"""One image vocabulary: which files are images, how they are decoded, and which pixels a certificate is about.

Everything that reads an image (training, indexing, queries, the UI, benchmarks) goes through here:

    IMAGE_EXTENSIONS                 the suffixes that count as images (compared lower-case)
    decode_bytes(data, limits)       bytes → loaded first frame (PIL), notes, format; DecodeError with a reason
    pixels(image)                    PIL image → Pixels: the file's own samples, in the file's own channels
    to_rgb(samples, layout)          differentiable float map from those samples to the RGB the encoder sees

The certified input (DESIGN.md, "Certificates"; issue: certificates for non-RGB files)
-------------------------------------------------------------------------------------
A certificate is stated over *the file's own samples*: each sample scaled to [0, 1] by its bit depth
(v / (2^bits − 1), never by the data's range), in the file's own channels (1 for grayscale, 2 for
grey + alpha, 4 for RGBA or CMYK, …), after EXIF orientation (a permutation of pixel positions, hence
an ℓ2 isometry). The map to the encoder's input is

    samples x ─Φ (per pixel, float)→ RGB ─R (float bilinear resize, per channel)→ encoder input,

and ‖R(Φ(x)) − R(Φ(y))‖ ≤ ‖R‖₂·Lip(Φ)·‖x − y‖. Φ acts on every pixel separately with the same
function φ: Rᶜ → R³, so ‖Φ(x) − Φ(y)‖² = Σ_p ‖φ(x_p) − φ(y_p)‖² ≤ c²·‖x − y‖² with c = Lip(φ);
R acts on each RGB channel with the same matrix, so its norm on 3 channels is ‖R‖₂. Samples are
clamped to [0, 1] first (a projection onto a convex box: 1-Lipschitz), and on that box every φ below is
smooth, so c = sup ‖J_φ‖₂ over the box (mean-value inequality on a convex set). Per layout:

    RGB    φ = id                                            c = 1
    L      φ(g) = (g, g, g)             J = 1₃               c = ‖1₃‖ = √3
    LA     φ(g, a) = 1 − a(1 − g)·1₃    J = 1₃·[a, g − 1]    ‖J‖ = √3·√(a² + (1 − g)²) ≤ √6   (a = 1, g = 0)
    RGBA   φ(c, a) = 1 − a(1 − c)       J = [a·I₃ | c − 1]   JJᵀ = a²I + (1 − c)(1 − c)ᵀ,
                                                             λ_max = a² + ‖1 − c‖² ≤ 1 + 3 → c = 2   (a = 1, c = 0)
    CMYK   φ(u, k) = (1 − u)(1 − k)     J = −[(1 − k)·I₃ | 1 − u]   (Pillow's own formula, in float)
                                                             λ_max = (1 − k)² + ‖1 − u‖² ≤ 4 → c = 2   (white)
    YCbCr  φ = clamp(M·(y, cb − ½, cr − ½))  (JFIF, as Pillow) c = σ_max(M) (clamp is 1-Lipschitz)

Alpha is composited onto white, as before. Every bound is attained (the constants are exact, not
loose), and tests/test_image_soundness.py checks each against an independent Jacobian search and
attacks it.

Decodes that are not continuous in the file's samples cannot be certified by any factor: a colour key
(PNG tRNS: a pixel that reaches the key colour jumps to white), palette images (an index is not a
continuous quantity, and a change of palette entry moves every pixel using it), 16-bit samples that a
decoder reduces to 8 bits, samples whose depth is unknown, and conversions Pillow does in 8-bit
integers (premultiplied alpha, LAB, HSV). Such images are still embedded; `Pixels.uncertified` says why
no radius can be stated, and search results then carry no radius.

16-bit PNGs with more than one channel (which Pillow reduces to 8 bits) are decoded at their real depth
with pypng; the samples travel with the PIL image in `image.info[SAMPLES16_KEY]`.
"""
from __future__ import annotations

import contextlib
import io
import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS", "DecodeLimits", "DecodeError", "decode_bytes", "check_shape", "oriented_size",
    "exif_orientation", "Pixels", "pixels", "to_rgb", "channel_lipschitz", "LAYOUT_CHANNELS", "SAMPLES16_KEY",
    "is_image_name", "DecodeBudget", "decode_cost", "check_header", "to_pil", "lossless_file", "thumbnail_jpeg",
]

# Extensions that count as images (compared lower-case), for training, indexing and benchmarks alike.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})

SAMPLES16_KEY = "robret.samples16"  # image.info entry: (H, W, C) uint16 samples of a 16-bit PNG

# Channels of each layout `to_rgb` accepts.
LAYOUT_CHANNELS = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4, "CMYK": 4, "YCbCr": 3}

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112

# JFIF YCbCr → RGB (ITU-R BT.601 full range), the matrix Pillow and libjpeg use.
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


def is_image_name(name: str) -> bool:
    """True when a file name has one of IMAGE_EXTENSIONS (hidden files excluded)."""
    dot = name.rfind(".")
    return dot > 0 and not name.startswith(".") and name[dot:].lower() in IMAGE_EXTENSIONS


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
    symlink_escape, symlink_broken, symlink_loop; from a list or an object store, outside_root and
    unsafe_name).
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


# Decoding ---------------------------------------------------------------------------------------
class DecodeBudget:
    """Bounds the memory of the images being decoded at once, across threads.

    `reserve(n)` blocks until n more bytes fit under `max_bytes`; an image larger than the whole budget
    waits until it is alone (so it is never refused for that, only serialised).
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("a decode budget needs a positive number of bytes")
        self.max_bytes = int(max_bytes)
        self.used = 0
        self.peak = 0  # the most ever reserved at once (for tests and benchmarks)
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        n = min(int(nbytes), self.max_bytes)
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.max_bytes)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cv:
                self.used -= n
                self._cv.notify_all()


def decode_cost(data: bytes) -> int:
    """Bytes that decoding and preprocessing this file will hold at peak, from its header alone:
    the decoder's image as Pillow stores it (4 bytes per pixel for every multi-band mode, RGB included;
    1, 2 or 4 for single-band modes), a copy of its samples where `pixels` cannot read them from that
    image band by band (16-bit, float, palette and colour-key images; for 16-bit colour PNGs also pypng's
    uint16 rows, their stacked copy and their int32 widening), plus the float bands `to_input` converts
    (≤ 32 bytes per pixel of a band of 2²⁰ pixels). 0 when the header cannot be read (`decode_bytes`
    will say why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            bands = len(im.getbands())
            depth = 4 if im.mode in ("I", "F") else (2 if im.mode.startswith("I;16") else 1)
            wide = _has_16bit_tiles(im)
            streamed = (im.mode in _STREAMED_MODES and not wide
                        and not ("transparency" in im.info and im.mode in ("L", "RGB")))
    except Exception:
        return 0
    stored = w * h * (4 if bands > 1 else depth)  # Pillow's storage (measured: 256 MB for a 64 MP RGB PNG)
    samples = w * h * bands * (8 if wide else depth)  # uint16 rows + stacked copy + int32 widening: 8 B/sample
    return stored + (0 if streamed else samples) + 32 * 2**20


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


def check_header(head: bytes) -> None:
    """Refuse, from its first bytes alone, a file that no image decoder would accept: DecodeError(text |
    not_image). Lets a reader stop before reading the body of a large non-image file. The same test
    Pillow's `Image.open` makes (each format's magic-number check on the first 16 bytes), plus a header
    parse for the few formats that have no magic number (TGA, …)."""
    if not head:
        return
    Image.init()
    if any(_accepts(accept, head[:16]) for _, accept in Image.OPEN.values()):
        return
    no_magic = [fmt for fmt, (_, accept) in Image.OPEN.items() if accept is None]
    try:
        with Image.open(io.BytesIO(head), formats=no_magic):
            return
    except Exception:
        pass
    if _looks_like_text(head[:512]):
        raise DecodeError("text", "a text file, not an image (despite its extension)")
    raise DecodeError("not_image", "unrecognised image format")


def _accepts(accept, head: bytes) -> bool:
    """One format's magic-number check, as `Image.open` runs it: a check that raises (Pillow's BMP check reads 4
    bytes with struct, so a file of 1–3 bytes raises struct.error) does not accept."""
    if accept is None:
        return False
    try:
        return bool(accept(head))
    except Exception:
        return False


def decode_bytes(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[Image.Image, list[str], str | None]:
    """Bytes → (loaded first frame, notes, format). Raises DecodeError (see class doc).

    The pixel limit is checked from the header, before any pixel is decoded. 16-bit PNGs that Pillow
    would reduce to 8 bits carry their full-depth samples in `image.info[SAMPLES16_KEY]`.
    Callers must silence PIL's DecompressionBombWarning themselves (warnings filters are process-global).
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
        fmt = im.format
        frame = im.copy() if n_frames > 1 else im
        if frame is not im:
            im.close()
        if wide_samples:
            samples = _png16_samples(data) if fmt == "PNG" and "transparency" not in frame.info else None
            if samples is not None and samples.shape[:2] == (h, w):
                frame.info[SAMPLES16_KEY] = samples
            else:
                frame.info["robret.reduced16"] = True
        notes.extend(_mode_notes(frame))
        return frame, notes, fmt
    except DecodeError:
        im.close()
        raise
    except Exception as exc:  # a decoder bug on hostile input must not abort a build
        im.close()
        raise DecodeError("corrupt", f"decoder failed ({type(exc).__name__}: {exc})") from None


def _has_16bit_tiles(im: Image.Image) -> bool:
    # e.g. a 16-bit RGB PNG: Pillow decodes it as 8-bit RGB with raw mode "RGB;16B". (16-bit grayscale
    # comes out as mode I;16, which keeps every bit, so it does not count here.)
    if im.mode.startswith("I") or im.mode == "F":
        return False
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        if ";16" in str(args):
            return True
    return False


def _png16_samples(data: bytes) -> np.ndarray | None:
    """(H, W, C) uint16 samples of a 16-bit PNG (grey+alpha, RGB, RGBA), or None when pypng cannot read it."""
    import png  # pypng: pure Python, reads 16-bit PNGs without reducing them

    try:
        width, height, rows, info = png.Reader(bytes=data).read()
        if info.get("bitdepth") != 16 or info.get("palette") or "transparent" in info:
            return None
        arr = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    except Exception:  # pypng refuses what Pillow accepted: fall back to Pillow's 8-bit pixels
        return None
    return arr.reshape(height, width, info["planes"])


def _mode_notes(im: Image.Image) -> list[str]:
    notes = []
    if SAMPLES16_KEY in im.info or im.mode.startswith("I;16") or im.mode == "I":
        notes.append("16-bit samples scaled to [0, 1]")
    elif im.info.get("robret.reduced16"):
        notes.append("16-bit samples reduced to 8 bits by the decoder")
    if im.mode == "F":
        notes.append("floating-point samples clipped to [0, 1]")
    if im.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif im.mode in ("P", "PA"):
        notes.append("palette expanded to RGB")
    elif im.mode in ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append("grayscale replicated to RGB")
    elif im.mode in ("YCbCr", "LAB", "HSV"):
        notes.append(f"{im.mode} converted to RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        notes.append("alpha composited onto white")
    orientation = exif_orientation(im)
    if orientation in range(2, 9):
        notes.append(f"EXIF orientation {orientation} applied")
    return notes


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or malformed; values outside 1..8 are ignored by decoding)."""
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF: ignored, as exif_transpose would
        return 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without transposing the pixels."""
    w, h = im.size
    return (h, w) if exif_orientation(im) in _SWAPS_AXES else (w, h)


def check_shape(width: int, height: int, limits: DecodeLimits) -> None:
    """DecodeError(too_small | too_elongated) for images no embedding should be made of."""
    short, long = min(width, height), max(width, height)
    if short < limits.min_side:
        raise DecodeError("too_small", f"{width}×{height} pixels (shorter side below {limits.min_side})")
    if long / short > limits.max_aspect:
        raise DecodeError("too_elongated",
                          f"{width}×{height} pixels (aspect {long / short:.1f}:1 exceeds {limits.max_aspect:g}:1)")


# The certified pixel space ----------------------------------------------------------------------
@lru_cache(maxsize=None)
def channel_lipschitz(layout: str) -> float:
    """Lipschitz constant c of the per-pixel map φ from a layout's samples to RGB (module docstring).

    Exact (every bound is attained on [0, 1]ᶜ); rounded up by a relative 1e-12 so that float error can
    only shrink a radius.
    """
    if layout == "RGB":
        return 1.0
    exact = {"L": math.sqrt(3.0), "LA": math.sqrt(6.0), "RGBA": 2.0, "CMYK": 2.0}
    if layout in exact:
        return exact[layout] * (1 + 1e-12)
    if layout == "YCbCr":
        return float(np.linalg.norm(_YCBCR_TO_RGB, 2)) * (1 + 1e-12)
    raise ValueError(f"unknown channel layout {layout!r}; expected one of {sorted(LAYOUT_CHANNELS)}")


def to_rgb(samples, layout: str):
    """Samples (..., C, H, W) in the layout's channels → RGB (..., 3, H, W) in [0, 1]; differentiable.

    The float form of the conversions in the module docstring (alpha on white; Pillow's CMYK and JFIF
    YCbCr formulas without their 8-bit rounding). Samples are clamped to [0, 1] first. `samples` is a
    numpy array or a torch tensor: the function uses only operations both have (methods, operators and
    indexing), so one definition serves the numpy path that reduces a query before torch is loaded
    (`encoder.resize.reduce_to_input`) and the differentiable path attacks take.
    """
    c = LAYOUT_CHANNELS.get(layout)
    if c is None:
        raise ValueError(f"unknown channel layout {layout!r}; expected one of {sorted(LAYOUT_CHANNELS)}")
    if samples.shape[-3] != c:
        raise ValueError(f"layout {layout} has {c} channel(s), got samples of shape {tuple(samples.shape)}")
    x = samples.clip(0, 1)
    grey3 = [0, 0, 0]  # channel 0 three times (a copy, as torch's repeat)
    if layout == "RGB":
        return x
    if layout == "L":
        return x[..., grey3, :, :]
    if layout == "LA":
        g, a = x[..., 0:1, :, :], x[..., 1:2, :, :]
        return (1 - a * (1 - g))[..., grey3, :, :]
    if layout == "RGBA":
        return 1 - x[..., 3:4, :, :] * (1 - x[..., :3, :, :])
    if layout == "CMYK":
        return (1 - x[..., :3, :, :]) * (1 - x[..., 3:4, :, :])
    # YCbCr: M·(y, cb − ½, cr − ½) per pixel, with the channel axis moved last for the matrix product
    shift = _like(x, [0.0, 0.5, 0.5]).reshape(3, 1, 1)
    return ((x - shift).swapaxes(-3, -1) @ _like(x, _YCBCR_TO_RGB.T)).swapaxes(-3, -1).clip(0, 1)


def _like(x, values):
    """`values` as an array of x's own kind (numpy array or torch tensor), dtype and device."""
    return np.asarray(values, dtype=x.dtype) if isinstance(x, np.ndarray) else x.new_tensor(values)


@dataclass
class Pixels:
    """An image as the file's own samples: the space in which its certificates are stated.

    samples = clip(raw / scale, 0, 1): float32 (C, H, W), each sample / (2^bits − 1), EXIF orientation
    applied. The integer samples come either from `raw` (the decoder's integer samples, a view of them
    where possible) or, when `raw` is None, straight from the decoder's `image`, a band of rows at a
    time (`raw_rows`): a large 8-bit image then costs only the decoder's own copy, never a second one.
    `uncertified` is None when the decode is a continuous function of those samples; otherwise it says
    why no radius can be stated (the image can still be embedded).

    Every array is numpy (torch.from_numpy views it without a copy): reading and reducing an image needs
    no torch, so a query can be reduced to the encoder's input before torch is loaded
    (`encoder.resize.reduce_to_input`).
    """

    raw: np.ndarray | None  # (C, H, W) as decoded: uint8, int32 (16-bit and 32-bit integers) or float32
    scale: float  # 2^bits − 1 (1 for float and bilevel samples)
    layout: str  # one of LAYOUT_CHANNELS
    bits: int  # sample depth in the file (1, 8, 16; 32 for float samples)
    uncertified: str | None = None  # why the decode is not continuous in the samples (None: certifiable)
    image: Image.Image | None = None  # with raw None: the decoder's 8-bit image, EXIF orientation not applied
    orientation: int = 1  # EXIF orientation applied to `image`'s rows on the way out (1..8)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), after EXIF orientation."""
        if self.raw is not None:
            return tuple(self.raw.shape[-2:])
        w, h = self.image.size
        return (w, h) if self.orientation in _SWAPS_AXES else (h, w)

    @property
    def channels(self) -> int:
        """Samples per pixel (the layout's channels)."""
        return LAYOUT_CHANNELS[self.layout]

    def raw_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the integer samples (C, r1 − r0, W), oriented.

        From `image`: EXIF orientation is a permutation of pixel positions, so the oriented rows r0..r1
        are one rectangle of the stored image (rows for orientations 1–4, columns for 5–8, counted from
        the far side when flipped), permuted by the same `_TRANSPOSE` table as 16-bit samples.
        """
        if self.raw is not None:
            return self.raw[:, r0:r1]
        w, h = self.image.size
        o = self.orientation
        if o in (1, 2):
            box = (0, r0, w, r1)
        elif o in (3, 4):
            box = (0, h - r1, w, h - r0)
        elif o in (5, 6):
            box = (r0, 0, r1, h)
        else:  # 7, 8
            box = (w - r1, 0, w - r0, h)
        arr = _array(self.image, box)[:, :, : self.channels]  # RGBX: its padding band is dropped
        return _raw(_TRANSPOSE[o](arr) if o in _TRANSPOSE else arr)

    @property
    def samples(self) -> np.ndarray:
        """float32 (C, H, W) in [0, 1]: the certified input space."""
        return self.samples_rows(0, self.size[0])

    def samples_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of `samples` (a band, for images too large to convert whole)."""
        band = self.raw_rows(r0, r1).astype(np.float32, order="C")  # (C, rows, W) in that order
        if self.scale != 1:
            band /= np.float32(self.scale)
        return np.clip(band, 0, 1, out=band)

    @property
    def channel_lipschitz(self) -> float:
        return channel_lipschitz(self.layout)

    def rgb(self) -> np.ndarray:
        """(3, H, W) float32 RGB in [0, 1]: what the encoder's resize sees."""
        return to_rgb(self.samples, self.layout)

    def rgb_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of `rgb()` (the conversion is per pixel, so bands convert independently)."""
        return to_rgb(self.samples_rows(r0, r1), self.layout)

    def describe(self) -> str:
        """The space a radius is stated in, e.g. "ℓ2 over the file's 1-channel 16-bit samples (L, 640×480) scaled to [0,1]"."""
        depth = "floating-point" if self.bits == 32 else f"{self.bits}-bit"
        h, w = self.size
        return (f"ℓ2 over the file's {self.channels}-channel {depth} samples ({self.layout}, {w}×{h}) scaled to [0,1]")


# 8-bit modes whose samples `Pixels.raw_rows` reads straight from the decoder's image.
_STREAMED_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "RGBX"})

_TRANSPOSE = {  # EXIF orientation → the same operation on an (H, W, …) array
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _array(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The pixels of an 8-bit-per-sample image (or of `box` in it) as an (H, W, bands) uint8 array, copied
    band by band of rows (np.asarray goes through a whole-image bytes object: a 64-megapixel RGB image
    would briefly cost three copies, 576 MB, instead of one)."""
    x0, y0, x1, y1 = box or (0, 0, *image.size)
    w, h = x1 - x0, y1 - y0
    bands = len(image.getbands())
    out = np.empty((h, w, bands), dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, w))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        out[r0:r1] = np.frombuffer(image.crop((x0, y0 + r0, x1, y0 + r1)).tobytes(),
                                   dtype=np.uint8).reshape(r1 - r0, w, bands)
    return out


def _raw(arr: np.ndarray) -> np.ndarray:
    """(H, W[, C]) decoded samples → (C, H, W) array (a view) without a float copy (uint16 widened to int32)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # torch has no general uint16 arithmetic
        arr = arr.astype(np.int32)
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.transpose(2, 0, 1)


def to_pil(samples, layout: str = "RGB") -> Image.Image:
    """Samples (C, H, W) in [0, 1] (a numpy array or a torch tensor) → an 8-bit PIL image in the layout's own
    mode (L, LA, RGB, RGBA, CMYK, YCbCr), each sample rounded to the nearest of 256 levels (the inverse of
    `pixels` for 8-bit files)."""
    if layout not in LAYOUT_CHANNELS:
        raise ValueError(f"unknown channel layout {layout!r}; expected one of {sorted(LAYOUT_CHANNELS)}")
    if not isinstance(samples, np.ndarray):  # a tensor (any device, maybe requiring grad)
        samples = samples.detach().cpu().float().numpy()
    u8 = (np.clip(samples.astype(np.float32, copy=False), 0, 1) * np.float32(255)).round().astype(np.uint8)
    arr = u8.transpose(1, 2, 0)
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode=layout)


def lossless_file(image: Image.Image) -> tuple[bytes, str, str]:
    """(bytes, suffix, media type) of an 8-bit image in its own mode, without loss: PNG for L, LA, RGB and RGBA, TIFF
    for CMYK and YCbCr, which PNG cannot hold (an adversarial image keeps the samples its ‖δ‖ was measured over)."""
    buf = io.BytesIO()
    if image.mode in ("CMYK", "YCbCr"):
        image.save(buf, format="TIFF", compression="tiff_adobe_deflate")
        return buf.getvalue(), ".tiff", "image/tiff"
    image.save(buf, format="PNG")
    return buf.getvalue(), ".png", "image/png"


def thumbnail_jpeg(image: Image.Image, side: int, quality: int = 85) -> bytes:
    """JPEG thumbnail (longest side ≤ side) of what the encoder sees: `pixels(image).rgb()`, so EXIF
    orientation, alpha on white, 16-bit samples and CMYK look as they are embedded."""
    im = to_pil(pixels(image).rgb())
    im.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _sample_depth_of_mode_i(image: Image.Image) -> tuple[int, str | None]:
    """Bit depth of a mode-"I" image, from its format (never from its data), and a reason when unknown."""
    if image.format in ("PPM", "PNG"):  # Pillow scales PGM maxval > 255 to 16 bits; PNG gray is ≤ 16 bits
        return 16, None
    if image.format == "TIFF":
        bits = image.tag_v2.get(258) if hasattr(image, "tag_v2") else None
        bits = bits[0] if isinstance(bits, tuple) else bits
        if bits in (16, 32):
            return int(bits), None
    return 16, "32-bit integer samples of unknown depth (scaled as 16-bit and clipped)"


def pixels(image: Image.Image | Pixels) -> Pixels:
    """A decoded PIL image (any mode) → its samples in the file's own channels (see module docstring).

    EXIF orientation is applied (orientations outside 1..8 are ignored). Modes whose decode is not
    continuous in the samples come back with `uncertified` set and samples that still give the right
    RGB (palette expanded, key colour on white, …), so that they can be embedded.
    """
    if isinstance(image, Pixels):
        return image
    orientation = exif_orientation(image)
    wide = image.info.get(SAMPLES16_KEY)
    uncertified = None
    if "transparency" in image.info and image.mode in ("L", "RGB", "1", "I", "I;16"):
        uncertified = ("colour-key transparency (PNG tRNS): a pixel that reaches the key colour jumps to "
                       "white, so no radius holds")
    if image.info.get("robret.reduced16"):
        uncertified = "16-bit samples that the decoder reduced to 8 bits: a change of 1/65535 can move a pixel by 1/255"
    o = orientation if orientation in range(2, 9) else 1
    if wide is not None:
        wide = _TRANSPOSE[o](wide) if o in _TRANSPOSE else wide
        if wide.shape[:2] == oriented_size(image)[::-1]:
            layout = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[wide.shape[2]]
            return Pixels(_raw(wide), 65535.0, layout, 16, uncertified)
        # the image was transformed after decoding (its 16-bit samples no longer match it): 8 bits, uncertified
        uncertified = uncertified or "16-bit samples that no longer match the image (transformed after decoding)"
    mode = image.mode
    if mode in _STREAMED_MODES and not ("transparency" in image.info and mode in ("L", "RGB")):
        # 8-bit samples read from the decoder's image band by band (Pixels.raw_rows): no second copy
        return Pixels(None, 255.0, "RGB" if mode == "RGBX" else mode, 8, uncertified, image=image, orientation=o)
    image = ImageOps.exif_transpose(image) if o > 1 else image
    mode = image.mode
    if mode == "1":
        return Pixels(_raw(np.asarray(image)), 1.0, "L", 1, uncertified)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Pixels(_raw(np.asarray(image)), 65535.0, "L", 16, uncertified)
    if mode == "I":
        bits, reason = _sample_depth_of_mode_i(image)
        return Pixels(_raw(np.asarray(image)), 2.0 ** bits - 1, "L", bits, uncertified or reason)
    if mode == "F":
        return Pixels(_raw(np.asarray(image)), 1.0, "L", 32, uncertified)
    if "transparency" in image.info and mode in ("L", "RGB"):
        # the key colour becomes transparent (uncertified above)
        return Pixels(_raw(_array(image.convert("RGBA"))), 255.0, "RGBA", 8, uncertified)
    # Modes whose conversion is not a continuous function of the samples: expand with Pillow, refuse to certify.
    reasons = {
        "P": "palette image: its samples are palette indices, not intensities",
        "PA": "palette image: its samples are palette indices, not intensities",
        "La": "premultiplied alpha, converted by Pillow in 8-bit integers",
        "RGBa": "premultiplied alpha, converted by Pillow in 8-bit integers",
        "LAB": "CIELAB samples, converted by Pillow in 8-bit integers",
        "HSV": "HSV samples: hue wraps around, so the conversion is not continuous",
    }
    has_alpha = mode in ("PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    target = "RGBA" if has_alpha else "RGB"
    converted = image.convert(target)
    return Pixels(_raw(_array(converted)), 255.0, target, 8,
                  uncertified or reasons.get(mode, f"image mode {mode} converted by Pillow"))
