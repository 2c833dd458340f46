"""Image folders for training: recursive listing, decoding with bad files skipped (with a reason).

    paths = list_images(root)                       # sorted, recursive, common extensions
    images, skipped = load_images(paths)            # [(path, (3,H,W) float in [0,1])], [(path, reason)]

Listing and decoding go through the one image vocabulary (encoder/image.py: the extension list,
`decode_bytes` with its limits, and `pixels` for EXIF rotation, alpha on white and 16-bit scaling), so
training sees exactly the files and pixels that indexing and the encoders' `preprocess` see.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..image import IMAGE_EXTENSIONS, DecodeLimits, decode_bytes, is_image_name
from ..preprocess import pil_to_tensor

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image", "load_images", "ImageFolder"]

log = logging.getLogger(__name__)

def list_images(root: str | os.PathLike) -> list[Path]:
    """Every file under `root` (recursively, symlinks followed) with an image extension (encoder.image); sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        found.extend(Path(dirpath) / name for name in files if is_image_name(name))
    return sorted(found)


def load_image(path: str | os.PathLike, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Decode one image file to float32 (3, H, W) in [0, 1]; raises OSError/ValueError (DecodeError) when unreadable."""
    image, _notes, _fmt = decode_bytes(Path(path).read_bytes(), limits)
    with image:
        return pil_to_tensor(image)


def load_images(paths, min_side: int = 8) -> tuple[list[tuple[Path, torch.Tensor]], list[tuple[Path, str]]]:
    """Decode `paths`; returns (loaded, skipped) where skipped lists (path, reason) for bad files."""
    loaded, skipped = [], []
    for path in paths:
        path = Path(path)
        try:
            x = load_image(path)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            reason = f"cannot decode: {type(exc).__name__}: {exc}"
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            continue
        if min(x.shape[-2:]) < min_side:
            reason = f"too small ({x.shape[-1]}x{x.shape[-2]} < {min_side} px)"
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            continue
        loaded.append((path, x))
    return loaded, skipped


class ImageFolder(torch.utils.data.Dataset):
    """Map-style dataset of the decodable images under `root` (or of given files).

    `cache=True` decodes everything once and keeps it in memory (small folders, e.g. the demo
    photos); otherwise each access decodes the file. Items are float (3, H, W) in [0, 1].
    Files that fail to decode are listed in `skipped` as (path, reason); with `cache=False` a file
    that becomes unreadable later raises.
    """

    def __init__(self, root: str | os.PathLike | None = None, paths=None, cache: bool = False,
                 min_side: int = 8):
        if paths is None:
            if root is None:
                raise ValueError("give a root folder or a list of paths")
            paths = list_images(root)
        paths = [Path(p) for p in paths]
        self.root = Path(root) if root is not None else None
        if cache:
            loaded, self.skipped = load_images(paths, min_side=min_side)
            self.paths = [p for p, _ in loaded]
            self._cache = [x for _, x in loaded]
        else:
            self.skipped = []
            self.paths = []
            for p in paths:
                try:
                    with Image.open(p) as im:
                        w, h = im.size
                except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                    self.skipped.append((p, f"cannot open: {type(exc).__name__}: {exc}"))
                    log.warning("skipping %s: %s", p, self.skipped[-1][1])
                    continue
                if min(w, h) < min_side:
                    self.skipped.append((p, f"too small ({w}x{h} < {min_side} px)"))
                    continue
                self.paths.append(p)
            self._cache = None
        if not self.paths:
            raise ValueError(f"no readable images in {root if root is not None else 'the given paths'}"
                             + (f" ({len(self.skipped)} skipped)" if self.skipped else ""))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[i]
        return load_image(self.paths[i])

    def relpaths(self) -> list[str]:
        """Paths relative to the root (as stored in teacher-embedding files)."""
        if self.root is None:
            return [str(p) for p in self.paths]
        return [str(p.relative_to(self.root)) for p in self.paths]
