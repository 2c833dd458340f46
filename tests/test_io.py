"""encoder/io.py: the one atomic writer and the one safetensors-with-header format, and every file
kind that goes through them (LipSim, standard CNN, teacher embeddings, training state, bundled weights)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from encoder.io import CheckpointError, atomic_write, atomic_write_text, load_tensors, read_header, save_tensors
from encoder.registry import bundled_weights, load_encoder


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "old")
    seen = []
    atomic_write(path, lambda tmp: tmp.write_text("new"), before_replace=lambda tmp: seen.append(
        (tmp.parent, tmp.name.endswith(".tmp"), tmp.read_text(), path.read_text())))
    assert path.read_text() == "new"
    # The hook saw a finished temporary file beside the destination while the old file was still in place.
    assert seen == [(path.parent, True, "new", "old")]
    assert os.listdir(path.parent) == ["f.txt"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def torn(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, torn)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_tensor_file_round_trips_header_and_tensors(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int64)}
    path = save_tensors(tmp_path / "t.safetensors", tensors, "robret-x", "3", {"k": [1, 2]}, note="plain",
                        provenance={"steps": 2})
    head = read_header(path, "robret-x", "3", "x file", json_fields=("provenance",))
    assert head["config"] == {"k": [1, 2]} and head["note"] == "plain" and head["provenance"] == {"steps": 2}
    back = load_tensors(path)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    with pytest.raises(CheckpointError, match="not a robret y file"):
        read_header(path, "robret-y", "3", "y file")
    with pytest.raises(CheckpointError, match="version '3'; this robret reads 4"):
        read_header(path, "robret-x", "4", "x file")


def test_unreadable_tensor_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_header(path, "robret-x", "1", "x file")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tensors(path)


@pytest.mark.parametrize("spec", [f"{prefix}:{name}" for prefix in ("lipsim", "standard")
                                  for name in bundled_weights(prefix)])
def test_bundled_weights_load_unchanged_through_the_shared_format(spec):
    enc = load_encoder(spec)
    assert enc.pretrained and enc.metadata["provenance"]["command"].startswith("robret train demo")
    x = torch.rand(2, 3, enc.input_size, enc.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e = enc.embed(x)
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)


class _Folder:
    """The two things compute_teacher_embeddings needs of an ImageFolder."""

    def __init__(self, images, names):
        self.images, self.names, self.root = images, names, "folder"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    def relpaths(self):
        return list(self.names)


def test_teacher_embeddings_round_trip_and_old_files_still_read(tmp_path):
    from encoder.pixels import PixelsEncoder
    from encoder.train import PrecomputedTeacher, compute_teacher_embeddings
    from encoder.train.distill import center_view

    g = torch.Generator().manual_seed(0)
    folder = _Folder([torch.rand(3, 20, 24, generator=g) for _ in range(3)], ["a.png", "b/c.png", "d.jpg"])
    enc = PixelsEncoder(8)
    path = compute_teacher_embeddings(enc, folder, tmp_path / "t.safetensors", batch_size=2)
    teacher = PrecomputedTeacher(path, folder)
    with torch.no_grad():
        want = enc.embed(torch.stack([center_view(x, 8) for x in folder.images]))
    assert torch.equal(teacher.embeddings, want)
    assert teacher.name == "precomputed:pixels:8" and teacher.paths == folder.relpaths() and teacher.dim == 193
    assert read_header(path, "robret-teacher-embeddings", "1", "t")["config"]["teacher"] == "pixels:8"
    # A file in the layout written before the header had a version and a config.
    old = tmp_path / "old.safetensors"
    save_file({"embeddings": want}, str(old), metadata={"format": "robret-teacher-embeddings", "teacher": "pixels:8",
                                                         "paths": json.dumps(folder.relpaths())})
    legacy = PrecomputedTeacher(old, folder)
    assert torch.equal(legacy.embeddings, want) and legacy.name == teacher.name
    with pytest.raises(ValueError, match="different list of images"):
        PrecomputedTeacher(path, _Folder(folder.images, ["x.png", "y.png", "z.png"]))


def test_bundled_lipsim_demo_header_holds_the_demo_shape_which_is_no_preset():
    from encoder.checkpoint import read_header as read_lipsim_header
    from encoder.presets import PRESETS
    from encoder.train.demo import DEMO_LIPSIM

    head = read_lipsim_header(bundled_weights("lipsim")["demo"])
    assert head["config"] == DEMO_LIPSIM and head["preset"] == "custom"
    assert DEMO_LIPSIM not in PRESETS.values()
