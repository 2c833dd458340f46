"""Near-duplicate regions of a photo: the class definition that the retrieval benchmark
(retrieval/bench_data.py) and robust metric-learning training (encoder/train/robdml.py) share.

A photo gives many distinct square regions (three scales, centres drawn at random, any two
overlapping by IoU < max_iou), each resized to size × size; a region's near-duplicates are the
region again after two or three realistic edits drawn from: a small shift of the crop window
(≤ 8% of its side), a rescale of it (×0.9–1.1), JPEG (quality 30–70), Gaussian blur (radius
0.4–1.0 px), Gaussian noise (σ 0.01–0.03), colour (brightness, contrast, saturation ×0.85–1.15).
Every draw comes from the NumPy generator the caller passes, so a seed fixes everything.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

__all__ = ["SCALES", "EDITS", "regions", "crop_region", "edit_region"]

SCALES = (0.22, 0.3, 0.4)  # crop side as a fraction of the photo's shorter side
EDITS = ("shift", "rescale", "jpeg", "blur", "noise", "colour")


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def regions(w: int, h: int, count: int, rng: np.random.Generator, max_iou: float) -> list[tuple]:
    """Up to `count` square boxes (x0, y0, x1, y1) inside w×h with pairwise IoU < max_iou."""
    boxes: list[tuple] = []
    attempts = 0
    while len(boxes) < count and attempts < 400 * count:
        attempts += 1
        side = SCALES[rng.integers(len(SCALES))] * min(w, h)
        # keep room for the query's shift/rescale inside the photo
        margin = 0.12 * side
        lo, hi_x, hi_y = margin, w - side - margin, h - side - margin
        if hi_x <= lo or hi_y <= lo:
            continue
        x0, y0 = rng.uniform(lo, hi_x), rng.uniform(lo, hi_y)
        box = (x0, y0, x0 + side, y0 + side)
        if all(_iou(box, b) < max_iou for b in boxes):
            boxes.append(box)
    return boxes


def crop_region(photo: Image.Image, box, size: int) -> Image.Image:
    return photo.resize((size, size), Image.Resampling.LANCZOS, box=tuple(float(v) for v in box))


def edit_region(photo: Image.Image, box, size: int, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """The region `box` of `photo` after 2–3 random edits (see module doc); returns (image, edit log)."""
    chosen = sorted(rng.choice(len(EDITS), size=int(rng.integers(2, 4)), replace=False))
    names = [EDITS[i] for i in chosen]
    log = []
    x0, y0, x1, y1 = box
    side = x1 - x0
    if "rescale" in names:
        f = rng.uniform(0.9, 1.1)
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, side * f / 2
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        log.append(f"rescale×{f:.3f}")
    if "shift" in names:
        dx, dy = rng.uniform(-0.08, 0.08, size=2) * side
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        log.append(f"shift({dx:+.1f},{dy:+.1f})px")
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(photo.width), x1), min(float(photo.height), y1)
    im = crop_region(photo, (x0, y0, x1, y1), size)
    if "colour" in names:
        b, c, s = rng.uniform(0.85, 1.15, size=3)
        im = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c)).enhance(s)
        log.append(f"colour(b{b:.2f},c{c:.2f},s{s:.2f})")
    if "blur" in names:
        r = rng.uniform(0.4, 1.0)
        im = im.filter(ImageFilter.GaussianBlur(r))
        log.append(f"blur({r:.2f})")
    if "noise" in names:
        sigma = rng.uniform(0.01, 0.03)
        arr = np.asarray(im, dtype=np.float32) / 255.0 + rng.normal(0.0, sigma, size=(size, size, 3))
        im = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))
        log.append(f"noise({sigma:.3f})")
    if "jpeg" in names:
        q = int(rng.integers(30, 71))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as j:
            im = j.convert("RGB")
        log.append(f"jpeg(q{q})")
    return im, log
