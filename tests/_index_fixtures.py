"""Shared helpers for the index tests: small photo folders and a catalogue of hostile files."""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

def round_tf32(x) -> np.ndarray:
    """float32 rounded to TF32's 10-bit mantissa (round to nearest even on the 13 dropped bits): what a GPU
    computing in TF32 sees of its inputs (the GPU stand-ins of tests/test_faiss_gpu.py and tests/test_gpu_scan.py)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    b = (b + 0x0FFF + ((b >> 13) & 1)) & np.uint32(0xFFFFE000)
    return b.view(np.float32)


def unit_rows(n: int, seed: int = 0, dim: int = 33) -> np.ndarray:
    """n random float32 unit vectors of `dim` coordinates (a standard normal draw of `seed`, normalised)."""
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# Photos small enough that a tiny-encoder build of the folder takes well under a second.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "rocket",
          "text", "page")


def copy_photos(src: Path, dst: Path, names=PHOTOS) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / f"{n}.png", dst / f"{n}.png")
    return dst


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (for headers PIL would refuse to write: bombs, 16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def _noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def _save(im: Image.Image, path: Path, **kw) -> None:
    im.save(path, **kw)


# name → (expected status, substring of the reason (failed) or of the notes (indexed), or None)
def make_hostile_folder(root: Path) -> dict[str, tuple[str, str | None]]:
    """Write one file per hostile-input kind under `root`; return what each should produce."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, tuple[str, str | None]] = {}
    good = Image.fromarray(_noise(48, 64, 0))
    buf = io.BytesIO()
    good.save(buf, "PNG")
    good_png = buf.getvalue()
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=90)
    good_jpg = buf.getvalue()

    (root / "good.png").write_bytes(good_png)
    expect["good.png"] = ("indexed", None)
    (root / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    expect["truncated.jpg"] = ("failed", "truncated")
    corrupt = bytearray(good_png)
    at = corrupt.find(b"IDAT")
    for j in range(at + 20, at + 60):
        corrupt[j] ^= 0x55
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    expect["corrupt.png"] = ("failed", "corrupt")
    (root / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = ("failed", "empty")
    (root / "readme.png").write_text("This is not an image, just some text.\nSecond line.\n")
    expect["readme.png"] = ("failed", "text")
    (root / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    expect["noise.jpg"] = ("failed", "not_image")
    (root / "hi.png").write_bytes(b"hi\n")  # 1–3 bytes: Pillow's BMP check raises struct.error on them
    expect["hi.png"] = ("failed", "text")
    (root / "soi.jpg").write_bytes(b"\xff\xd8")
    expect["soi.jpg"] = ("failed", "not_image")
    # Decompression bombs: a header PIL itself refuses, and one only our pixel limit refuses.
    (root / "bomb.png").write_bytes(png_bytes(100_000, 100_000, 1, 0, b"\x00" * 64))
    expect["bomb.png"] = ("failed", "too_many_pixels")
    (root / "bomb-small.png").write_bytes(png_bytes(9_000, 9_000, 1, 0, b"\x00" * 64))
    expect["bomb-small.png"] = ("failed", "too_many_pixels")
    _save(Image.fromarray(_noise(40, 40, 2)).convert("CMYK"), root / "cmyk.jpg")
    expect["cmyk.jpg"] = ("indexed", "CMYK")
    gray16 = (np.random.default_rng(3).random((40, 40)) * 65535).astype(np.uint16)
    _save(Image.fromarray(gray16), root / "gray16.png")
    expect["gray16.png"] = ("indexed", "16-bit")
    rgb16 = (np.random.default_rng(4).random((32, 32, 3)) * 65535).astype(">u2")
    raw = b"".join(b"\x00" + rgb16[i].tobytes() for i in range(32))
    (root / "rgb16.png").write_bytes(png_bytes(32, 32, 16, 2, raw))
    expect["rgb16.png"] = ("indexed", "16-bit")
    _save(Image.fromarray(_noise(40, 40, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), root / "palette.png")
    expect["palette.png"] = ("indexed", "palette")
    rgba = np.concatenate([_noise(40, 40, 6), _noise(40, 40, 7, 1)[..., None]], axis=2)
    _save(Image.fromarray(rgba, "RGBA"), root / "alpha.png")
    expect["alpha.png"] = ("indexed", "alpha")
    _save(Image.fromarray(_noise(40, 40, 8, 1), "L"), root / "gray.png")
    expect["gray.png"] = ("indexed", "grayscale")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: a 60×30 file shows as 30×60
    _save(Image.fromarray(_noise(30, 60, 9)), root / "rotated.jpg", exif=exif, quality=95)
    expect["rotated.jpg"] = ("indexed", "EXIF orientation 6")
    frames = [Image.fromarray(_noise(32, 32, 10 + i)).convert("P") for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expect["animated.gif"] = ("indexed", "animated (3 frames)")
    _save(Image.fromarray(_noise(4, 4, 20)), root / "tiny.png")
    expect["tiny.png"] = ("failed", "too_small")
    _save(Image.fromarray(_noise(10, 400, 21)), root / "strip.png")
    expect["strip.png"] = ("failed", "too_elongated")
    # Symlinks: inside the root (followed), out of it, broken, self-referential; a directory loop.
    outside = root.parent / (root.name + "-outside")
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(good_png)
    os.symlink(root / "good.png", root / "link-inside.png")
    expect["link-inside.png"] = ("indexed", None)
    os.symlink(outside / "secret.png", root / "link-escape.png")
    expect["link-escape.png"] = ("failed", "symlink_escape")
    os.symlink(root / "nowhere.png", root / "link-broken.png")
    expect["link-broken.png"] = ("failed", "symlink_broken")
    os.symlink("link-self.png", root / "link-self.png")
    expect["link-self.png"] = ("failed", "symlink_loop")
    (root / "sub").mkdir()
    (root / "sub" / "nested.png").write_bytes(image_bytes(_noise(40, 40, 22)))
    expect["sub/nested.png"] = ("indexed", None)
    os.symlink("..", root / "sub" / "loop")  # back to the root: must not be walked again
    os.symlink(outside, root / "sub" / "out")  # a directory outside: not followed
    # A FIFO with an image name: opening it would block forever.
    os.mkfifo(root / "pipe.png")
    expect["pipe.png"] = ("failed", "not_regular")
    # A file name that is not UTF-8.
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:
        f.write(image_bytes(_noise(40, 40, 23)))
    expect["caf\\xe9.png"] = ("indexed", "not valid UTF-8")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return expect


def image_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def catalog_rows(index_dir) -> dict:
    """{path: (id, status, reason kind, content_hash)} over every catalog row of an index directory."""
    from index.catalog import Catalog
    from index.layout import IndexDir

    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    try:
        return {r.path: (r.id, r.status, (r.reason or "").split(":", 1)[0] or None, r.content_hash)
                for r in catalog.find()}
    finally:
        catalog.close()


def index_vectors(index_dir) -> dict:
    """{id: stored vector} of an index directory."""
    from index import Gallery

    with Gallery.open(index_dir, use_gpu=False) as g:
        ids, vecs = g.all_vectors()
        return dict(zip(ids.tolist(), vecs))


def assert_same_index(a, b, atol: float = 0.0) -> None:
    """Same rows (ids, paths, statuses, reasons, hashes) and the same vectors (to `atol`); `b` verifies."""
    from index import verify_index

    ra, rb = catalog_rows(a), catalog_rows(b)
    assert ra == rb
    va, vb = index_vectors(a), index_vectors(b)
    assert va.keys() == vb.keys() == {i for i, status, *_ in ra.values() if status == "indexed"}
    for i in va:
        np.testing.assert_allclose(va[i], vb[i], rtol=0, atol=atol)
    assert verify_index(b).ok
