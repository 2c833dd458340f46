"""NIGHTS (DreamSim's 2AFC dataset, Fu et al. 2023) on its real on-disk layout.

    nights/
      data.csv            id, left_vote, right_vote, votes, ref_path, left_path, right_path, split,
                          is_imagenet, prompt   (paths relative to the nights/ folder)
      ref/000/002.png     reference images
      distort/000/002_0.png, 002_1.png   the two candidates (left = x0, right = x1)

As in DreamSim: rows with fewer than 6 votes are dropped; the target is p = right_vote, the fraction
of people who found the right image (x1) closer to the reference; the splits are train, val and
test, the test split being divided into test_imagenet and test_no_imagenet (by `is_imagenet`).
A split column that already says test_imagenet / test_no_imagenet is accepted too.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .folder import load_image

__all__ = ["NIGHTS_COLUMNS", "NIGHTS_SPLITS", "TwoAFCRow", "read_nights", "NightsDataset", "find_nights_root"]

NIGHTS_COLUMNS = ("id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                  "is_imagenet", "prompt")
NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
MIN_VOTES = 6


@dataclass(frozen=True)
class TwoAFCRow:
    """One 2AFC judgement: which of left (x0) / right (x1) is closer to ref; p = P(right)."""

    id: str
    ref: Path  # absolute paths
    left: Path
    right: Path
    p: float  # right_vote: fraction of votes for the right image (x1)
    votes: int
    split: str  # train, val, test_imagenet or test_no_imagenet
    is_imagenet: bool
    prompt: str


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "t"):
        return True
    if t in ("false", "0", "no", "f", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def find_nights_root(path: str | os.PathLike) -> Path:
    """The folder holding data.csv: `path` itself or its `nights/` subfolder."""
    path = Path(path)
    for cand in (path, path / "nights"):
        if (cand / "data.csv").is_file():
            return cand
    raise FileNotFoundError(f"no NIGHTS data.csv in {path} or {path / 'nights'}")


def read_nights(path: str | os.PathLike, split: str = "train", min_votes: int = MIN_VOTES,
                check_files: bool = False) -> list[TwoAFCRow]:
    """Rows of data.csv for `split` (train, val, test, test_imagenet, test_no_imagenet, or all)
    with votes ≥ min_votes. `test` returns both test parts. Paths are resolved against the
    folder holding data.csv; `check_files` raises FileNotFoundError for a missing image.
    """
    if split not in (*NIGHTS_SPLITS, "all"):
        raise ValueError(f"unknown NIGHTS split {split!r}; known: {', '.join(NIGHTS_SPLITS)}, all")
    root = find_nights_root(path)
    rows = []
    with open(root / "data.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in NIGHTS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{root / 'data.csv'} lacks columns {missing}")
        for raw in reader:
            votes = int(float(raw["votes"]))
            if votes < min_votes:
                continue
            imagenet = _bool(raw["is_imagenet"])
            row_split = raw["split"].strip()
            if row_split == "test":
                row_split = "test_imagenet" if imagenet else "test_no_imagenet"
            if split == "test":
                if not row_split.startswith("test"):
                    continue
            elif split != "all" and row_split != split:
                continue
            row = TwoAFCRow(
                id=str(raw["id"]), ref=root / raw["ref_path"], left=root / raw["left_path"],
                right=root / raw["right_path"], p=float(raw["right_vote"]), votes=votes, split=row_split,
                is_imagenet=imagenet, prompt=raw["prompt"],
            )
            if check_files:
                for p in (row.ref, row.left, row.right):
                    if not p.is_file():
                        raise FileNotFoundError(f"NIGHTS row {row.id}: missing image {p}")
            rows.append(row)
    return rows


class NightsDataset(torch.utils.data.Dataset):
    """Items (ref, x0, x1, p, index): images resized to `size` (float, [0,1]) through `to_tensor`
    (default: the encoders' float bilinear resize), p a float32 scalar (P(x1 preferred))."""

    def __init__(self, rows: list[TwoAFCRow], size: int, cache: bool = False):
        self.rows = list(rows)
        self.size = size
        self._cache: dict[Path, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, path: Path) -> torch.Tensor:
        from ..preprocess import resize

        if self._cache is not None and path in self._cache:
            return self._cache[path]
        x = resize(load_image(path), self.size)
        if self._cache is not None:
            self._cache[path] = x
        return x

    def __getitem__(self, i: int):
        r = self.rows[i]
        return self._load(r.ref), self._load(r.left), self._load(r.right), torch.tensor(r.p, dtype=torch.float32), i

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything stacked: (ref, x0, x1) (N, 3, S, S) and p (N,)."""
        items = [self[i] for i in range(len(self))]
        return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                torch.stack([it[2] for it in items]), torch.stack([it[3] for it in items]))
