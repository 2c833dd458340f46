"""Retrieval benchmark data: a near-duplicate benchmark built offline from real photos, or a labelled folder.

Near-duplicate benchmark (`heldout_benchmark`), deterministic for a given seed and size:
- sources: only `encoder.samples.HELDOUT_PHOTOS`, the photos the demo models never saw in training;
- gallery: from every photo, many distinct square regions (encoder.data.regions: three scales,
  centres drawn at random, any two overlapping by IoU < `max_iou`), resized to size × size; the first
  `crops_per_photo` of each photo are queried, the remaining `distractors_per_photo` are not
  (hard distractors: same photo, same statistics, nothing to find);
- queries: each queried region again, after two or three realistic edits drawn from: a small shift
  of the crop window (≤ 8% of its side), a rescale of it (×0.9–1.1), JPEG (quality 30–70),
  Gaussian blur (radius 0.4–1.0 px), Gaussian noise (σ 0.01–0.03), colour (brightness, contrast,
  saturation ×0.85–1.15). Label = the gallery index of the region it came from.

Labelled folder (`folder_benchmark`): one sub-folder per class (CUB-200, CARS-196, SOP are commonly
laid out so); every image is a query against all the others (leave-one-out, as robrank evaluates).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from encoder.data.folder import load_image
from encoder.data.regions import EDITS, crop_region, edit_region, regions
from encoder.image import IMAGE_EXTENSIONS, is_image_name, to_pil

__all__ = ["RetrievalDataset", "heldout_benchmark", "folder_benchmark", "load_benchmark", "IMAGE_EXTENSIONS", "EDITS"]


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
        """n_queries evenly spaced queries (every photo / class keeps its share), the gallery unchanged."""
        q = self.queries.shape[0]
        idx = torch.linspace(0, q - 1, min(n_queries, q)).round().long().unique()
        info = dict(self.info, query_subset=idx.tolist())
        if "query_edits" in info:
            info["query_edits"] = [info["query_edits"][i] for i in idx.tolist()]
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


def heldout_benchmark(size: int = 64, crops_per_photo: int = 24, distractors_per_photo: int = 12,
                      seed: int = 0, max_iou: float = 0.25, photos=None) -> RetrievalDataset:
    """The offline near-duplicate benchmark (module doc) from encoder.samples.HELDOUT_PHOTOS."""
    from encoder.samples import HELDOUT_PHOTOS, sample_photo

    photos = tuple(photos or HELDOUT_PHOTOS)
    unknown = [p for p in photos if p not in HELDOUT_PHOTOS]
    if unknown:
        raise ValueError(f"the benchmark only uses held-out photos; not held out: {unknown}")
    gallery, g_labels, queries, q_labels, edits, sources = [], [], [], [], [], []
    for p_idx, name in enumerate(photos):
        photo = sample_photo(name).convert("RGB")
        rng = np.random.default_rng([seed, p_idx])
        boxes = regions(photo.width, photo.height, crops_per_photo + distractors_per_photo, rng, max_iou)
        for b_idx, box in enumerate(boxes):
            label = len(gallery)
            gallery.append(crop_region(photo, box, size))
            g_labels.append(label)
            sources.append(name)
            if b_idx < crops_per_photo:
                im, log = edit_region(photo, box, size, rng)
                queries.append(im)
                q_labels.append(label)
                edits.append(log)
    info = {"source": "encoder.samples.HELDOUT_PHOTOS", "photos": list(photos), "seed": seed,
            "crops_per_photo": crops_per_photo, "distractors_per_photo": distractors_per_photo,
            "max_iou": max_iou, "distractors": len(gallery) - len(queries), "gallery_sources": sources,
            "query_edits": edits}
    return RetrievalDataset("heldout", _to_tensor(gallery), torch.tensor(g_labels, dtype=torch.long),
                            _to_tensor(queries), torch.tensor(q_labels, dtype=torch.long),
                            torch.full((len(queries),), -1, dtype=torch.long), info)


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


def load_benchmark(spec: str = "heldout", size: int = 64, quick: bool = False, seed: int = 0) -> RetrievalDataset:
    """"heldout" (the offline benchmark; `quick`: 2 regions + 1 distractor per photo) or a folder path."""
    if spec == "heldout":
        if quick:
            return heldout_benchmark(size, crops_per_photo=2, distractors_per_photo=1, seed=seed)
        return heldout_benchmark(size, seed=seed)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: not 'heldout' and not a folder")
    return folder_benchmark(path, size, max_per_class=5 if quick else None, max_queries=32 if quick else None)
