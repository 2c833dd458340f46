"""NIGHTS reader on a synthesised data.csv, and the synthetic NIGHTS-layout generator."""
from __future__ import annotations

import csv

import pytest
import torch

from encoder.data import NIGHTS_COLUMNS, NightsDataset, make_synthetic_nights, read_nights
from encoder.data.synthetic import _save_png

ROWS = [
    # id, left_vote, right_vote, votes, split, is_imagenet, prompt
    ("0", 0.25, 0.75, 8, "train", "True", "a dog"),
    ("1", 1.0, 0.0, 5, "train", "False", "too few votes"),
    ("2", 0.5, 0.5, 6, "val", "False", "tie"),
    ("3", 0.0, 1.0, 6, "test", "True", "an imagenet test row"),
    ("4", 0.8333, 0.1667, 12, "test", "False", "a non-imagenet test row"),
    ("5", 1.0, 0.0, 7, "test", "False", "another non-imagenet test row"),
    ("6", 0.0, 1.0, 2, "test", "True", "dropped test row"),
]


@pytest.fixture()
def nights_dir(tmp_path):
    root = tmp_path / "nights"
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    with open(root / "data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(NIGHTS_COLUMNS))
        w.writeheader()
        for rid, lv, rv, votes, split, imnet, prompt in ROWS:
            paths = {"ref_path": f"ref/000/{rid}.png", "left_path": f"distort/000/{rid}_0.png",
                     "right_path": f"distort/000/{rid}_1.png"}
            for rel in paths.values():
                _save_png(torch.rand(3, 20, 24, generator=g), root / rel)
            w.writerow({"id": rid, "left_vote": lv, "right_vote": rv, "votes": votes, "split": split,
                        "is_imagenet": imnet, "prompt": prompt, **paths})
    return tmp_path


def test_reader_keeps_rows_with_at_least_six_votes_and_reads_every_column(nights_dir):
    rows = read_nights(nights_dir, "all")
    assert [r.id for r in rows] == ["0", "2", "3", "4", "5"]
    r0 = rows[0]
    assert r0.p == 0.75 and r0.votes == 8 and r0.split == "train" and r0.is_imagenet is True
    assert r0.prompt == "a dog"
    assert r0.ref == nights_dir / "nights" / "ref/000/0.png" and r0.ref.is_file()
    assert r0.left.name == "0_0.png" and r0.right.name == "0_1.png"


def test_reader_splits_test_into_imagenet_and_no_imagenet(nights_dir):
    assert [r.id for r in read_nights(nights_dir, "train")] == ["0"]
    assert [r.id for r in read_nights(nights_dir, "val")] == ["2"]
    assert [r.id for r in read_nights(nights_dir / "nights", "test_imagenet")] == ["3"]
    assert [r.id for r in read_nights(nights_dir, "test_no_imagenet")] == ["4", "5"]
    assert [r.id for r in read_nights(nights_dir, "test")] == ["3", "4", "5"]
    assert read_nights(nights_dir, "train", min_votes=5)[1].id == "1"


def test_reader_rejects_unknown_split_and_missing_columns(nights_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown NIGHTS split"):
        read_nights(nights_dir, "dev")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.csv").write_text("id,left_vote\n0,1\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_nights(bad)
    with pytest.raises(FileNotFoundError):
        read_nights(tmp_path / "nowhere")


def test_dataset_resizes_to_the_encoder_input_and_returns_p(nights_dir):
    ds = NightsDataset(read_nights(nights_dir, "test"), size=16)
    ref, x0, x1, p, i = ds[0]
    assert ref.shape == x0.shape == x1.shape == (3, 16, 16) and i == 0
    assert p.item() == 1.0
    assert ds.tensors()[3].tolist() == pytest.approx([1.0, 0.1667, 0.0])


def test_synthetic_set_has_nights_layout_and_the_less_edited_image_is_the_choice(tmp_path):
    g = torch.Generator().manual_seed(1)
    photos = [("a", torch.rand(3, 40, 50, generator=g)), ("b", torch.rand(3, 48, 48, generator=g))]
    root = make_synthetic_nights(photos, tmp_path, per_image=6, size=16, split={"train": 0.5, "val": 0.5},
                                 kinds=("noise",))
    assert (root / "data.csv").is_file() and (root / "ref").is_dir() and (root / "distort").is_dir()
    rows = read_nights(tmp_path, "all", check_files=True)
    assert len(rows) == 12 and {r.split for r in rows} <= {"train", "val"}
    assert all(r.prompt.startswith("synthetic:") and r.votes == 6 and r.p in (0.0, 1.0) for r in rows)
    assert 0 < sum(r.p for r in rows) < 12  # the chosen side varies
    ref, x0, x1, p = NightsDataset(rows, 16).tensors()
    # Noise of lower strength leaves the chosen image closer to the reference in pixels.
    d0 = (ref - x0).flatten(1).norm(dim=1)
    d1 = (ref - x1).flatten(1).norm(dim=1)
    assert torch.equal(d1 < d0, p == 1)


def test_synthetic_distractor_rows_use_another_photo(tmp_path):
    photos = [("a", torch.zeros(3, 32, 32)), ("b", torch.ones(3, 32, 32))]
    make_synthetic_nights(photos, tmp_path, per_image=8, size=16, kinds=("noise",), distractor_p=1.0, low=(0, 0.01),
                          gap=(0.0, 0.01))
    rows = read_nights(tmp_path, "all")
    assert all("distractor" in r.prompt for r in rows)
    ref, x0, x1, p = NightsDataset(rows, 16).tensors()
    far = torch.where((p == 1)[:, None, None, None], x0, x1)
    assert ((far.mean((1, 2, 3)) - ref.mean((1, 2, 3))).abs() > 0.9).all()
