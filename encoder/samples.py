"""Real photographs that installed packages ship (scikit-image, matplotlib): robret's offline data.

Nothing is downloaded: each loader reads a file inside an installed package. Which photos train the
demo models and which are held out for evaluation is fixed here, once, for every consumer.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SAMPLE_PHOTOS", "DEMO_TRAIN_PHOTOS", "HELDOUT_PHOTOS", "sample_photo", "sample_photos",
           "export_sample_photos"]

# scikit-image's real photographs (cat is the same photo as chelsea and is left out).
SAMPLE_PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
    "text", "grace_hopper",
)

# The fixed split (keep it stable: shipped demo weights and benchmarks depend on it). The demo
# models (`robret train demo`) see only DEMO_TRAIN_PHOTOS; evaluation and the retrieval benchmark use
# only HELDOUT_PHOTOS. Both halves mix colour and grayscale photos, scenes and textures.
DEMO_TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "clock", "grass", "hubble_deep_field", "immunohistochemistry",
    "microaneurysms", "page", "rocket",
)
HELDOUT_PHOTOS: tuple[str, ...] = tuple(n for n in SAMPLE_PHOTOS if n not in DEMO_TRAIN_PHOTOS)


@functools.lru_cache(maxsize=None)
def sample_photo(name: str) -> Image.Image:
    """One sample photo as an RGB or L PIL image (no resizing, original pixels)."""
    if name == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        with Image.open(path) as im:
            return im.convert("RGB")
    import skimage.data

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}; known: {', '.join(SAMPLE_PHOTOS)}")
    arr = np.asarray(getattr(skimage.data, name)())
    return Image.fromarray(arr)


def sample_photos(names=None) -> dict[str, Image.Image]:
    """{name: PIL image} for `names` (default: all SAMPLE_PHOTOS)."""
    return {n: sample_photo(n) for n in (names or SAMPLE_PHOTOS)}


def export_sample_photos(folder: str | Path, names=None, fmt: str = "png") -> list[Path]:
    """Write sample photos as image files into `folder` (skipping ones already there); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, im in sample_photos(names).items():
        path = folder / f"{name}.{fmt}"
        if not path.exists():
            im.save(path)
        paths.append(path)
    return paths
