"""Retrieval benchmark data: a near-duplicate benchmark built offline from real photos, or a labelled folder.

Near-duplicate benchmark (`heldout_benchmark`, `photo_benchmark`), deterministic for a given seed and size:
- sources: held-out photos only, never seen in training: `encoder.samples.HELDOUT_PHOTOS` ("heldout"),
  plus the held-out wallpaper photographs of encoder/data/photos.py ("photos", after `make photos`);
- gallery: from every photo, many distinct square regions (three scales, centres drawn at random,
  any two regions of a photo overlapping by IoU < `max_iou`, at least 12% of the side from the
  photo's edge), resized to size × size; the first `crops_per_photo` of each photo are queried, the
  remaining `distractors_per_photo` are not (hard distractors: same photo, same statistics);
- queries: each queried region again, transformed by one family (`FAMILIES`, assigned in turn, so
  every family gets the same share of regions of every photo). Label = the gallery index of the
  region it came from. The families:

  edits        two or three mild edits drawn from: a small shift of the crop window (≤ 8% of its side),
               a rescale of it (×0.9–1.1), JPEG (quality 30–70), Gaussian blur (radius 0.4–1.0 px),
               Gaussian noise (σ 0.01–0.03), colour (brightness, contrast, saturation ×0.85–1.15)
               (the benchmark's original queries: aligned crops, which pixel distance handles well);
  flip         the region mirrored left–right;
  rotate       the region's window rotated about its centre by 3°–15° either way (`ROTATE_DEG`);
  crop         a window of the same size shifted so that it covers 50–70% of the region's area
               (`CROP_OVERLAP`), inside the photo and showing more of the region than of any other
               region of the photo (a region hemmed in by others so that no such window exists — 3 of
               192 on the sample photos — gets the next family instead);
  colour       white balance (red gain 1 + t, blue gain 1 − t, |t| 0.10–0.25), brightness ×0.75–1.25 and
               saturation ×0.6–1.4 (around ITU-R 601 luma), in float, then rounded to 8 bits;
  jpeg         JPEG at quality 5–15 (`JPEG_QUALITY`);
  perspective  each corner of the window moved by up to 8% of its side in x and y (`PERSPECTIVE_MAX`),
               the quadrilateral mapped back onto the square (a homography).

  Geometric windows (rotate, perspective) are rendered by Pillow's inverse mapping at ≥ the region's
  own resolution (bicubic) and reduced with Lanczos, as the gallery crops are. The 12% margin keeps
  rotated and perspective windows inside the photo: a square rotated by θ ≤ 15° reaches
  (cos θ + sin θ)/2 ≤ 0.613 of its side from its centre (≤ 0.5 + 0.12), perspective corners move
  ≤ 0.08 of it.

Labelled folder (`folder_benchmark`): one sub-folder per class (CUB-200, CARS-196, SOP are commonly
laid out so); every image is a query against all the others (leave-one-out, as robrank evaluates).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from encoder.data.folder import load_image
from encoder.data.regions import EDITS
from encoder.data.regions import crop_region as _crop
from encoder.data.regions import edit_region as _edit
from encoder.data.regions import regions as _regions
from encoder.image import IMAGE_EXTENSIONS, is_image_name, to_pil

__all__ = ["RetrievalDataset", "heldout_benchmark", "photo_benchmark", "near_duplicate_benchmark", "folder_benchmark",
           "load_benchmark", "IMAGE_EXTENSIONS", "FAMILIES", "EDITS", "homography", "warp_window", "rotated_window",
           "overlap_fraction"]
FAMILIES = ("edits", "flip", "rotate", "crop", "colour", "jpeg", "perspective")
ROTATE_DEG = (3.0, 15.0)  # |angle| range of the rotate family
CROP_OVERLAP = (0.5, 0.7)  # fraction of the region's area the crop family's window covers
JPEG_QUALITY = (5, 15)  # inclusive
PERSPECTIVE_MAX = 0.08  # largest corner move of the perspective family, as a fraction of the side
WB_SHIFT = (0.10, 0.25)  # |t| of the white-balance gains 1 ± t


@dataclass
class RetrievalDataset:
    """Images in [0, 1] and integer labels; query i matches the gallery items with its label."""

    name: str
    gallery: torch.Tensor  # (N, 3, S, S) float32 in [0, 1]
    gallery_labels: torch.Tensor  # (N,) int64
    queries: torch.Tensor  # (Q, 3, S, S) float32 in [0, 1]
    query_labels: torch.Tensor  # (Q,) int64
    query_self_index: torch.Tensor  # (Q,) int64: the query's own gallery position, or −1
    info: dict = field(default_factory=dict)  # provenance: sources, edits, seed, …

    @property
    def size(self) -> int:
        return int(self.gallery.shape[-1])

    def subset(self, n_queries: int) -> "RetrievalDataset":
        """n_queries evenly spaced queries (every photo / class keeps its share; with query families,
        evenly spaced within each family, n_queries // families of each), the gallery unchanged."""
        q = self.queries.shape[0]
        fam = self.info.get("query_family")
        if fam and len(set(fam)) > 1 and n_queries < q:
            per = max(1, n_queries // len(set(fam)))
            picks = []
            for f in dict.fromkeys(fam):
                rows = torch.tensor([i for i, x in enumerate(fam) if x == f])
                picks.append(rows[torch.linspace(0, len(rows) - 1, min(per, len(rows))).round().long().unique()])
            idx = torch.cat(picks).sort().values
        else:
            idx = torch.linspace(0, q - 1, min(n_queries, q)).round().long().unique()
        info = dict(self.info, query_subset=idx.tolist())
        for key in ("query_edits", "query_family", "query_params"):  # per-query lists follow the queries
            if key in info:
                info[key] = [info[key][i] for i in idx.tolist()]
        return RetrievalDataset(self.name, self.gallery, self.gallery_labels, self.queries[idx],
                                self.query_labels[idx], self.query_self_index[idx], info)

    def fingerprint(self) -> str:
        """SHA-256 of every pixel and label (determinism checks, result provenance)."""
        h = hashlib.sha256()
        for t in (self.gallery, self.gallery_labels, self.queries, self.query_labels, self.query_self_index):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        return {"name": self.name, "gallery": int(self.gallery.shape[0]), "queries": int(self.queries.shape[0]),
                "image_size": self.size, "fingerprint": self.fingerprint()[:16], **self.info}


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def overlap_fraction(a, b) -> float:
    """Area of the intersection of boxes a and b (x0, y0, x1, y1) over the area of b."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / ((b[2] - b[0]) * (b[3] - b[1]))


def homography(src, dst) -> np.ndarray:
    """The 3×3 projective map H (H[2, 2] = 1) with H·(u, v, 1) ∝ (x, y, 1) for the four point pairs
    src[i] = (u, v) → dst[i] = (x, y): the 8×8 linear system x·(g u + h v + 1) = a u + b v + c,
    y·(g u + h v + 1) = d u + e v + f."""
    rows, rhs = [], []
    for (u, v), (x, y) in zip(src, dst):
        rows.append([u, v, 1, 0, 0, 0, -u * x, -v * x])
        rows.append([0, 0, 0, u, v, 1, -u * y, -v * y])
        rhs += [x, y]
    coeffs = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(coeffs, 1.0).reshape(3, 3)


def warp_window(photo: Image.Image, quad, size: int) -> Image.Image:
    """The quadrilateral `quad` of `photo` (corners top-left, top-right, bottom-right, bottom-left, in
    the photo's continuous pixel coordinates) mapped onto a size × size square: the output point
    (u, v) ∈ [0, size]² shows the photo at H·(u, v), H the homography taking the square's corners to
    `quad`. Rendered by Pillow's inverse mapping (bicubic) at m·size, m = ⌈longest quad side / size⌉
    (no output pixel skips input pixels), then reduced to size with Lanczos."""
    quad = np.asarray(quad, dtype=np.float64)
    side = max(np.linalg.norm(quad[i] - quad[(i + 1) % 4]) for i in range(4))
    big = size * max(1, int(np.ceil(side / size)))
    H = homography([(0, 0), (big, 0), (big, big), (0, big)], quad)
    im = photo.transform((big, big), Image.Transform.PERSPECTIVE, tuple(H.ravel()[:8]), Image.Resampling.BICUBIC)
    return im if big == size else im.resize((size, size), Image.Resampling.LANCZOS)


def rotated_window(box, degrees: float) -> np.ndarray:
    """The corners (TL, TR, BR, BL) of square `box` rotated by `degrees` about its centre (x right,
    y down: positive angles turn the window clockwise on screen, so its content turns the other way)."""
    x0, y0, x1, y1 = box
    c = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    corners = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64) - c
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return corners @ rot.T + c


def _box_corners(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _intersection(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _crop_window(photo: Image.Image, box, others, rng: np.random.Generator):
    """A window of the region's size covering a fraction o ∈ CROP_OVERLAP of it (axis shifts a·side
    and b·side with (1 − a)(1 − b) = o, in directions drawn at random), inside the photo and showing
    more of the region than of any other region in `others` (the label stays unambiguous).
    Returns (window, o), or None when 500 draws find no such window (a region hemmed in by others).""" 
    x0, y0, x1, y1 = box
    side = x1 - x0
    for _ in range(500):
        o = rng.uniform(*CROP_OVERLAP)
        a = rng.uniform(0.0, 1.0 - o)
        b = 1.0 - o / (1.0 - a)
        if rng.random() < 0.5:
            a, b = b, a
        dx, dy = rng.choice((-1, 1)) * a * side, rng.choice((-1, 1)) * b * side
        win = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        if win[0] < 0 or win[1] < 0 or win[2] > photo.width or win[3] > photo.height:
            continue
        own = _intersection(win, box)
        if all(_intersection(win, other) < own for other in others):
            return win, overlap_fraction(win, box)
    return None


def _family_query(family: str, photo: Image.Image, box, others, size: int, rng: np.random.Generator):
    """(query image, edit log, parameters) of one family (module doc) for region `box`; None when the
    family cannot make an unambiguous query of it (crop only)."""
    if family == "flip":
        return _crop(photo, box, size).transpose(Image.Transpose.FLIP_LEFT_RIGHT), ["flip"], {}
    if family == "rotate":
        deg = float(rng.uniform(*ROTATE_DEG) * rng.choice((-1, 1)))
        quad = rotated_window(box, deg)
        return warp_window(photo, quad, size), [f"rotate({deg:+.1f}°)"], {"degrees": deg, "quad": quad.tolist()}
    if family == "crop":
        found = _crop_window(photo, box, others, rng)
        if found is None:
            return None
        win, o = found
        return _crop(photo, win, size), [f"crop(overlap {o:.2f})"], {"overlap": o, "window": list(win)}
    if family == "colour":
        t = float(rng.uniform(*WB_SHIFT) * rng.choice((-1, 1)))
        bright, sat = float(rng.uniform(0.75, 1.25)), float(rng.uniform(0.6, 1.4))
        x = np.asarray(_crop(photo, box, size), dtype=np.float64) / 255.0
        x = x * np.array([1 + t, 1.0, 1 - t]) * bright
        luma = x @ np.array([0.299, 0.587, 0.114])
        x = luma[..., None] + sat * (x - luma[..., None])
        im = Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8))
        return im, [f"whitebalance(t{t:+.2f},b{bright:.2f},s{sat:.2f})"], {"wb": t, "brightness": bright, "saturation": sat}
    if family == "jpeg":
        q = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        buf = io.BytesIO()
        _crop(photo, box, size).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as j:
            return j.convert("RGB"), [f"lowjpeg(q{q})"], {"quality": q}
    if family == "perspective":
        side = box[2] - box[0]
        moves = rng.uniform(-PERSPECTIVE_MAX, PERSPECTIVE_MAX, size=(4, 2)) * side
        quad = _box_corners(box) + moves
        return warp_window(photo, quad, size), ["perspective"], {"quad": quad.tolist()}
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def near_duplicate_benchmark(name: str, sources, size: int = 64, crops_per_photo: int = 24,
                             distractors_per_photo: int = 12, seed: int = 0, max_iou: float = 0.25,
                             families=FAMILIES) -> RetrievalDataset:
    """The near-duplicate benchmark (module doc) over `sources`, a list of (name, PIL image).
    info records per query its family, edit log and parameters (region box, angle, window, quad, …),
    and the box of every gallery item."""
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    gallery, g_labels, queries, q_labels, edits, fams, params, gsources, gboxes = [], [], [], [], [], [], [], [], []
    for p_idx, (src, photo) in enumerate(sources):
        photo = photo.convert("RGB")
        rng = np.random.default_rng([seed, p_idx])
        boxes = _regions(photo.width, photo.height, crops_per_photo + distractors_per_photo, rng, max_iou)
        for b_idx, box in enumerate(boxes):
            label = len(gallery)
            gallery.append(_crop(photo, box, size))
            g_labels.append(label)
            gsources.append(src)
            gboxes.append(list(box))
            if b_idx < crops_per_photo:
                turn = (p_idx + b_idx) % len(families)
                for family in families[turn:] + families[:turn]:  # the next family where one cannot serve
                    if family == "edits":  # the original queries: drawn from the photo's own stream, as before
                        im, log = _edit(photo, box, size, rng)
                        par = {}
                        break
                    frng = np.random.default_rng([seed, p_idx, b_idx, FAMILIES.index(family)])
                    others = [b for k, b in enumerate(boxes) if k != b_idx]
                    made = _family_query(family, photo, box, others, size, frng)
                    if made is not None:
                        im, log, par = made
                        break
                queries.append(im)
                q_labels.append(label)
                edits.append(log)
                fams.append(family)
                params.append(dict(par, box=list(box), photo_size=[photo.width, photo.height]))
    info = {"seed": seed, "crops_per_photo": crops_per_photo, "distractors_per_photo": distractors_per_photo,
            "max_iou": max_iou, "families": list(families), "distractors": len(gallery) - len(queries),
            "gallery_sources": gsources, "gallery_boxes": gboxes, "query_edits": edits, "query_family": fams,
            "query_params": params}
    return RetrievalDataset(name, _to_tensor(gallery), torch.tensor(g_labels, dtype=torch.long), _to_tensor(queries),
                            torch.tensor(q_labels, dtype=torch.long), torch.full((len(queries),), -1, dtype=torch.long),
                            info)


def heldout_benchmark(size: int = 64, crops_per_photo: int = 24, distractors_per_photo: int = 12,
                      seed: int = 0, max_iou: float = 0.25, photos=None, families=FAMILIES) -> RetrievalDataset:
    """The offline near-duplicate benchmark (module doc) from encoder.samples.HELDOUT_PHOTOS.
    With families=("edits",) it is the benchmark as first published (same pixels, same fingerprint)."""
    from encoder.samples import HELDOUT_PHOTOS, sample_photo

    photos = tuple(photos or HELDOUT_PHOTOS)
    unknown = [p for p in photos if p not in HELDOUT_PHOTOS]
    if unknown:
        raise ValueError(f"the benchmark only uses held-out photos; not held out: {unknown}")
    ds = near_duplicate_benchmark("heldout", [(n, sample_photo(n)) for n in photos], size, crops_per_photo,
                                  distractors_per_photo, seed, max_iou, families)
    ds.info = {"source": "encoder.samples.HELDOUT_PHOTOS", "photos": list(photos), **ds.info}
    return ds


def photo_benchmark(size: int = 64, crops_per_photo: int = 24, distractors_per_photo: int = 12, seed: int = 0,
                    max_iou: float = 0.25, families=FAMILIES) -> RetrievalDataset:
    """The near-duplicate benchmark over every held-out photo: the held-out wallpaper photographs
    (encoder.data.photos, installed by `make photos`; FileNotFoundError otherwise) and
    encoder.samples.HELDOUT_PHOTOS. Wallpapers (1600–3400 px high) are first reduced to a shorter side
    of max(512, 6·size), so that a region spans about 2–6 output sides, as in the sample photos."""
    from encoder.data.photos import installed_photos, load_reduced
    from encoder.samples import HELDOUT_PHOTOS, sample_photo

    records = installed_photos("heldout")
    shorter = max(512, 6 * size)
    sources = [(r.path, load_reduced(r.path, shorter)) for r in records]
    sources += [(n, sample_photo(n)) for n in HELDOUT_PHOTOS]
    ds = near_duplicate_benchmark("photos", sources, size, crops_per_photo, distractors_per_photo, seed,
                                  max_iou, families)
    ds.info = {"source": "held-out wallpaper photos (encoder/data/photos.csv) + encoder.samples.HELDOUT_PHOTOS",
               "photos": [s for s, _ in sources], "photo_sha256": [r.sha256 for r in records],
               "wallpaper_shorter_side": shorter, **ds.info}
    return ds


def folder_benchmark(root: str | Path, size: int = 64, max_per_class: int | None = None,
                     max_queries: int | None = None) -> RetrievalDataset:
    """A labelled folder (one sub-folder per class) as a leave-one-out retrieval set.

    Images are centre-cropped to a square and resized to size × size (EXIF rotation applied).
    Every image is both a gallery item and a query (its own position excluded from its ranking);
    `max_queries` keeps every ⌈n/max_queries⌉-th image as a query.
    """
    root = Path(root)
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-folders")
    images, labels, paths = [], [], []
    for c_idx, d in enumerate(classes):
        files = sorted(f for f in d.rglob("*") if f.is_file() and is_image_name(f.name))
        for f in files[:max_per_class]:
            images.append(ImageOps.fit(to_pil(load_image(f)), (size, size), Image.Resampling.LANCZOS))
            labels.append(c_idx)
            paths.append(str(f.relative_to(root)))
    if len({*labels}) < 2:
        raise ValueError(f"{root}: need at least two classes with images")
    x = _to_tensor(images)
    y = torch.tensor(labels, dtype=torch.long)
    n = len(images)
    q_idx = torch.arange(n)
    if max_queries is not None and max_queries < n:
        q_idx = q_idx[:: int(np.ceil(n / max_queries))]
    info = {"source": str(root), "classes": [d.name for d in classes], "files": paths}
    return RetrievalDataset(root.name, x, y, x[q_idx], y[q_idx], q_idx.clone(), info)


def load_benchmark(spec: str = "heldout", size: int = 64, quick: bool = False, seed: int = 0,
                   families=FAMILIES) -> RetrievalDataset:
    """"heldout" (the offline benchmark on the sample photos), "photos" (on every held-out photo, after
    `make photos`) — `quick`: 2 regions + 1 distractor per photo — or a labelled folder path."""
    if spec in ("heldout", "photos"):
        build = heldout_benchmark if spec == "heldout" else photo_benchmark
        if quick:
            return build(size, crops_per_photo=2, distractors_per_photo=1, seed=seed, families=families)
        return build(size, seed=seed, families=families)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: not 'heldout', not 'photos' and not a folder")
    return folder_benchmark(path, size, max_per_class=5 if quick else None, max_queries=32 if quick else None)
