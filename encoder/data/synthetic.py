"""A SYNTHETIC 2AFC set written in NIGHTS' exact on-disk layout, from any photo folder.

This is not human data. Each row is a random crop of a photo (the reference) and two edited
copies of it made with the same kind of everyday edit (JPEG, blur, noise, colour shift, shift,
rescale; see `augment.realistic_edit`) at two clearly different strengths. The less edited copy is
recorded as the unanimous "human" choice (6 of 6 votes), placed left or right at random:
right_vote = 1 when the right image (x1) is the less edited one. `prompt` says "synthetic: …" and
names the photo, the edit and both strengths, so no one mistakes the rows for NIGHTS judgements.

Optional distractor rows (`distractor_p` > 0, off by default): the farther candidate is instead a
crop of another photo, edited at the stronger strength; these teach "an edited copy is closer than
a different picture", the property near-duplicate retrieval needs. Their prompt says "distractor".

    make_synthetic_nights(images, out_dir, per_image=20, size=128, split="train", seed=0)
writes out_dir/nights/{data.csv, ref/<photo>/<k>.png, distort/<photo>/<k>_0.png, <k>_1.png}.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from ..image import to_pil
from ..io import atomic_write
from .augment import EDIT_KINDS, random_resized_crop, randint, realistic_edit, uniform
from .folder import ImageFolder
from .nights import NIGHTS_COLUMNS

__all__ = ["make_synthetic_nights"]


def _save_png(x: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(x).save(path)


def make_synthetic_nights(images, out_dir: str | os.PathLike, per_image: int = 20, size: int = 128,
                          split: str | dict[str, float] = "train", seed: int = 0,
                          crop_scale=(0.15, 1.0), low=(0.0, 0.3), gap=(0.35, 0.7),
                          kinds=EDIT_KINDS, distractor_p: float = 0.0) -> Path:
    """Write a synthetic NIGHTS-layout set; returns the `nights/` folder.

    images: a folder path, or a sequence of (name, float (3,H,W) [0,1] tensor) pairs.
    split: one split name for every row, or {split: fraction} assigned to rows at random.
    Strengths: the weaker edit s_lo ~ U(low), the stronger s_hi = min(1, s_lo + U(gap)).
    """
    if isinstance(images, (str, os.PathLike)):
        folder = ImageFolder(images, cache=True)
        images = [(Path(p).stem, folder[i]) for i, p in enumerate(folder.relpaths())]
    images = list(images)
    if not images:
        raise ValueError("no images to build a synthetic 2AFC set from")
    if distractor_p > 0 and len(images) < 2:
        raise ValueError("distractor rows need at least two photos")
    root = Path(out_dir) / "nights"
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if isinstance(split, str):
        split_names, split_cum = [split], [1.0]
    else:
        total = sum(split.values())
        split_names, split_cum, acc = list(split), [], 0.0
        for name in split_names:
            acc += split[name] / total
            split_cum.append(acc)
    rows = []
    for i_img, (name, img) in enumerate(images):
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        for k in range(per_image):
            ref = random_resized_crop(img, size, g, scale=crop_scale)
            kind = kinds[randint(g, 0, len(kinds) - 1)]
            s_lo = uniform(g, *low)
            s_hi = min(1.0, s_lo + uniform(g, *gap))
            weak = realistic_edit(ref, g, kind, s_lo)
            distractor = distractor_p > 0 and uniform(g) < distractor_p
            if distractor:
                j = randint(g, 0, len(images) - 2)
                j += j >= i_img
                other_name = images[j][0]
                strong = realistic_edit(random_resized_crop(images[j][1], size, g, scale=crop_scale), g, kind, s_hi)
            else:
                strong = realistic_edit(ref, g, kind, s_hi)
            weak_right = uniform(g) < 0.5
            left, right = (strong, weak) if weak_right else (weak, strong)
            r = uniform(g)
            row_split = next(n for n, c in zip(split_names, split_cum) if r <= c + 1e-12)
            rel_ref = f"ref/{safe}/{k:05d}.png"
            rel_l, rel_r = f"distort/{safe}/{k:05d}_0.png", f"distort/{safe}/{k:05d}_1.png"
            _save_png(ref, root / rel_ref)
            _save_png(left, root / rel_l)
            _save_png(right, root / rel_r)
            rows.append({
                "id": f"{safe}-{k:05d}", "left_vote": 0.0 if weak_right else 1.0,
                "right_vote": 1.0 if weak_right else 0.0, "votes": 6, "ref_path": rel_ref, "left_path": rel_l,
                "right_path": rel_r, "split": row_split, "is_imagenet": False,
                "prompt": (f"synthetic: {name} crop; {kind} left s={s_hi if weak_right else s_lo:.3f}, "
                           f"right s={s_lo if weak_right else s_hi:.3f}"
                           + (f"; distractor: the {'left' if weak_right else 'right'} image is a crop of "
                              f"{other_name}" if distractor else "")),
            })
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(NIGHTS_COLUMNS))
            w.writeheader()
            w.writerows(rows)

    atomic_write(root / "data.csv", write_csv)  # data.csv last: its presence marks a finished set
    return root
