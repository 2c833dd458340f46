"""`robret train …` subcommands end to end at tiny sizes: standard → teacher-embed → distill (live and
precomputed teacher) → synth → finetune → eval, each file read back through the library."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from encoder import load_encoder
from encoder.checkpoint import read_header
from encoder.io import load_tensors
from encoder.samples import DEMO_TRAIN_PHOTOS, sample_photo
from encoder.standard import read_standard_header
from encoder.train import PrecomputedTeacher
from encoder.train.distill import center_view
from retrieval.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--device", "cpu", "--no-progress", "--seed", "0"]


def _robret(*args) -> None:
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder of six small photos (one in a subfolder) and the standard CNN trained on it."""
    base = tmp_path_factory.mktemp("train-cli")
    photos = base / "photos"
    for i, name in enumerate(DEMO_TRAIN_PHOTOS[:6]):
        im = sample_photo(name).convert("RGB")
        im.thumbnail((48, 48))
        path = photos / ("sub" if i == 5 else "") / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    std = base / "std.safetensors"
    _robret("train", "standard", photos, "--out", std, "--input-size", 32, "--embed-dim", 32, "--steps", 3,
            "--batch-size", 4, "--checkpoint-every", 2, *TINY)
    return base, photos, std


def test_train_standard_writes_a_loadable_checkpoint_with_provenance_and_a_resumable_state(work, capsys):
    base, photos, std = work
    head = read_standard_header(std)
    assert head["config"].input_size == 32 and head["config"].embed_dim == 32
    assert head["provenance"]["command"].startswith("robret train standard") and head["provenance"]["data"] == str(photos)
    state = json.loads((base / "std.run" / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["images"] == 6
    enc = load_encoder(f"standard:{std}")
    assert enc.pretrained and enc.dim == 32 and enc.lipschitz is None
    # Run again: the state says the run is finished, so the same weights are written again.
    before = load_tensors(std)
    _robret("train", "standard", photos, "--out", std, "--input-size", 32, "--embed-dim", 32, "--steps", 3,
            "--batch-size", 4, "--checkpoint-every", 2, *TINY)
    after = load_tensors(std)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "wrote" in capsys.readouterr().out


def test_train_teacher_embed_then_distill_from_the_file(work, capsys):
    base, photos, std = work
    emb = base / "teacher.safetensors"
    _robret("train", "teacher-embed", photos, "--teacher", f"standard:{std}", "--out", emb, "--device", "cpu")
    teacher = PrecomputedTeacher(emb)
    assert teacher.paths == sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    assert teacher.name == "precomputed:standard:std"
    enc = load_encoder(f"standard:{std}")
    first = center_view(_load(photos / teacher.paths[0]), 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.embeddings[0], enc.embed(first[None])[0], atol=1e-6, rtol=0)

    out = base / "s1-pre.safetensors"
    _robret("train", "distill", photos, "--teacher-embeddings", emb, "--preset", "cpu-tiny", "--out", out,
            "--steps", 2, "--batch-size", 4, "--warmup-steps", 1, *TINY)
    head = read_header(out)
    assert head["preset"] == "cpu-tiny" and head["provenance"]["teacher"] == "precomputed:standard:std"
    assert head["provenance"]["stage"] == "distill" and head["provenance"]["config"]["steps"] == 2
    assert "final loss" in capsys.readouterr().out


def _load(path):
    from encoder.preprocess import pil_to_tensor

    with Image.open(path) as im:
        return pil_to_tensor(im)


@pytest.fixture(scope="module")
def distilled(work):
    base, photos, std = work
    out = base / "s1.safetensors"
    config = json.dumps({"input_size": 32, "channels": 8, "conv_depth": 2, "conv_inner": 8, "linear_depth": 1,
                         "linear_inner": 64, "embed_dim": 32})
    _robret("train", "distill", photos, "--teacher", f"standard:{std}", "--config", config, "--out", out,
            "--steps", 3, "--batch-size", 4, "--warmup-steps", 1, "--view2", "edit", "--cache", *TINY)
    return out


def test_train_distill_with_a_live_teacher_and_a_custom_shape(distilled):
    enc = load_encoder(f"lipsim:{distilled}")
    head = read_header(distilled)
    assert head["preset"] == "custom" and head["config"].conv_depth == 2 and head["provenance"]["teacher"] == "standard:std"
    assert enc.pretrained and enc.lipschitz == 1.0 and enc.dim == 33


def test_train_synth_finetune_and_eval(work, distilled, tmp_path, capsys):
    base, photos, _ = work
    nights = tmp_path / "syn"
    _robret("train", "synth", photos, nights, "--per-image", 2, "--size", 32, "--distractor-p", 0.5)
    rows = (nights / "nights" / "data.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6 and all("synthetic" in r or "distractor" in r for r in rows[1:])

    tuned = tmp_path / "s2.safetensors"
    _robret("train", "finetune", nights, "--init", distilled, "--out", tuned, "--steps", 2, "--batch-size", 4,
            "--margin", 0.2, *TINY)
    head = read_header(tuned)
    assert head["provenance"]["stage"] == "finetune" and head["provenance"]["config"]["margin"] == 0.2
    assert head["config"] == read_header(distilled)["config"]
    before, after = load_tensors(distilled), load_tensors(tuned)
    assert not all(torch.equal(before[k], after[k]) for k in before)  # two steps moved the weights

    result = tmp_path / "eval.json"
    capsys.readouterr()
    _robret("train", "eval", f"lipsim:{tuned}", f"standard:{base / 'std.safetensors'}", "--nights", nights,
            "--split", "train", "--attacks", "--eps", 36, "--json", result)
    table = capsys.readouterr().out
    assert "| lipsim:s2 |" in table and "| standard:std |" in table
    lip, std = json.loads(result.read_text())
    assert lip["n"] == std["n"] == 12 and 0 <= lip["natural"] <= 1 and 0 <= std["natural"] <= 1
    assert set(lip["certified"]) == {"36/255"} and std["certified"] == {}
    assert lip["certified"]["36/255"] <= lip["natural"]  # a certified answer is also a correct one
