"""The standard baseline's checkpoint and registry entry, and `robret train demo --quick` end to end."""
from __future__ import annotations

import json

import pytest
import torch

from encoder import load_encoder
from encoder.checkpoint import read_header
from encoder.samples import DEMO_TRAIN_PHOTOS, HELDOUT_PHOTOS, SAMPLE_PHOTOS
from encoder.standard import StandardConfig, StandardEncoder, load_standard, read_standard_header, save_standard

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_photo_split_is_fixed_disjoint_and_complete():
    assert set(DEMO_TRAIN_PHOTOS).isdisjoint(HELDOUT_PHOTOS)
    assert sorted(DEMO_TRAIN_PHOTOS + HELDOUT_PHOTOS) == sorted(SAMPLE_PHOTOS)
    assert len(HELDOUT_PHOTOS) == 8


def test_standard_checkpoint_round_trips_with_header_and_loads_through_the_registry(tmp_path):
    torch.manual_seed(0)
    enc = StandardEncoder(StandardConfig(input_size=16, widths=(8, 16), embed_dim=8)).freeze()
    path = save_standard(enc, tmp_path / "std.safetensors", provenance={"command": "test"})
    head = read_standard_header(path)
    assert head["format"] == "robret-standard" and head["provenance"] == {"command": "test"}
    loaded = load_encoder(f"standard:{path}")
    assert loaded.lipschitz is None and loaded.dim == 8 and loaded.input_size == 16
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.embed(x), enc.embed(x))
    assert torch.allclose(loaded.embed(x).norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="unknown standard checkpoint"):
        load_encoder("standard:no-such-model")


def test_train_demo_quick_runs_every_stage_and_ships_files_with_provenance(tmp_path, capsys):
    from retrieval.cli import main

    rc = main(["train", "demo", "--quick", "--run-dir", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "w"),
               "--no-progress", "--threads", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[5/5]" in out and "| lipsim:demo |" in out
    lip = read_header(tmp_path / "w" / "lipsim_demo.safetensors")
    prov = lip["provenance"]
    assert prov["command"].startswith("robret train demo") and prov["teacher"] == "standard:demo"
    assert set(prov["metrics"]["certified"]) == {"36/255", "72/255", "108/255", "255/255"}
    assert prov["data"]["heldout_photos"] == list(HELDOUT_PHOTOS)
    std = load_standard(tmp_path / "w" / "standard_demo.safetensors")
    assert std.metadata["provenance"]["metrics"]["certified"] == {}
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["lipsim:demo"]["n"] == 2 * len(HELDOUT_PHOTOS)
    # A second run finds every stage done and only re-prints the table.
    assert main(["train", "demo", "--quick", "--run-dir", str(tmp_path / "run"), "--no-ship", "--no-progress",
                 "--threads", "0"]) == 0
    assert "[1/5]" not in capsys.readouterr().out


def test_run_demo_logs_its_stages_and_restores_threads_and_random_state(tmp_path, capsys, caplog):
    import logging

    from encoder.train.demo import QUICK_PLAN, STAGES, run_demo

    import random

    import numpy as np

    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with caplog.at_level(logging.INFO, logger="encoder.train.demo"):
        result = run_demo(tmp_path / "run", None, QUICK_PLAN, threads=threads + 1, progress=False)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert (np.random.get_state()[1] == np_rng).all() and random.getstate() == py_rng
    assert capsys.readouterr().out == ""  # library code logs, never prints
    lines = [r.getMessage() for r in caplog.records if r.name == "encoder.train.demo"]
    assert [ln.split("]")[0] + "]" for ln in lines if ln.startswith("[")] == [f"[{i}/5]" for i in range(1, 6)]
    assert [s.name for s in STAGES] == ["standard", "distill", "synthetic", "finetune", "evaluate"]
    assert set(result["wall_seconds"]) == {s.name for s in STAGES}
    assert set(result["metrics"]) == {"lipsim:demo", "standard:demo", "lipsim:demo before fine-tuning"}
    assert (tmp_path / "run" / "eval.md").read_text().count("| lipsim:demo |") == 1
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_train_demo_without_the_wallpaper_photos_says_to_run_make_photos(tmp_path, capsys, monkeypatch):
    import csv

    from encoder.data import photos
    from retrieval.cli import main

    listed = tmp_path / "photos.csv"
    with open(listed, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["package", "path", "sha256", "width", "height", "split"])
        w.writerow(["mate-backgrounds", str(tmp_path / "absent.jpg"), "0" * 64, 10, 10, "train"])
    monkeypatch.setattr(photos, "RECORDED_CSV", listed)
    rc = main(["train", "demo", "--run-dir", str(tmp_path / "run"), "--no-ship", "--no-progress", "--threads", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "make photos" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "standard.safetensors").exists()


def test_train_demo_compare_to_checks_a_fresh_run_against_shipped_files_and_catches_a_changed_one(tmp_path, capsys):
    """`--compare-to`: a second run of the same plan in a fresh directory reproduces the shipped files bit for bit
    and every held-out score; a shipped file with one changed weight and one changed score is caught (exit 1)."""
    from encoder.checkpoint import load_lipsim, save_lipsim
    from retrieval.cli import main

    quick = ["train", "demo", "--quick", "--no-progress", "--threads", "0"]
    assert main(quick + ["--run-dir", str(tmp_path / "a"), "--weights-dir", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    assert main(quick + ["--run-dir", str(tmp_path / "b"), "--no-ship", "--compare-to", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "tensors bit-identical" in ln]
    assert len(lines) == 2 and all(ln.split(": ")[1].split(" of ")[0] == ln.split(" of ")[1].split()[0]
                                   for ln in lines)
    assert out.rstrip().endswith(": reproduced") and "largest difference 0.0000" in out

    # Change one weight and the recorded natural score of the shipped lipsim:demo.
    path = tmp_path / "w" / "lipsim_demo.safetensors"
    enc = load_lipsim(path, freeze=False)
    prov = read_header(path)["provenance"]
    with torch.no_grad():
        next(enc.net.parameters()).view(-1)[0] += 1e-3
    prov["metrics"]["natural"] += 0.25
    save_lipsim(enc, path, provenance=prov)
    assert main(quick + ["--run-dir", str(tmp_path / "b"), "--no-ship", "--compare-to", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    lipsim_line = next(ln for ln in out.splitlines() if ln.startswith(str(path)))
    assert "largest |difference| 0.001" in lipsim_line
    assert "lipsim:demo natural: run" in out and out.rstrip().endswith("NOT reproduced")
    # A tolerance wider than the change accepts the scores; comparing against the folder it ships to is refused.
    assert main(quick + ["--run-dir", str(tmp_path / "b"), "--no-ship", "--compare-to", str(tmp_path / "w"),
                         "--tolerance", "0.3"]) == 0
    capsys.readouterr()
    assert main(quick + ["--run-dir", str(tmp_path / "b"), "--weights-dir", str(tmp_path / "w"),
                         "--compare-to", str(tmp_path / "w")]) == 2
    assert "add --no-ship" in capsys.readouterr().err
    assert main(quick + ["--run-dir", str(tmp_path / "b"), "--no-ship", "--compare-to", str(tmp_path)]) == 2
