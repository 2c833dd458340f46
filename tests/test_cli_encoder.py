"""`robret --help`, `robret encoder info SPEC` for every preset, `robret encoder list` (in-process)."""
from __future__ import annotations

import json

import pytest

from encoder import get_preset, list_presets
from retrieval.cli import main

# The official shapes instantiate 63M–723M parameters with random weights and fold T⁻¹ into them
# (Gram products of up to 2048×23520 per dense layer): medium, large and xlarge take 10–35 s each
# on two cores (xlarge needs 6 GB), more than this suite's budget. The suite runs every CPU preset
# and `small` (the one official checkpoints use); benchmarks/lipsim_speed.py --info runs
# `robret encoder info` for every preset and docs/benchmarks/lipsim.md records it.
IN_TESTS = [p for p in list_presets() if p not in ("medium", "large", "xlarge")]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("encoder", "demo"):
        assert command in out
    assert main([]) == 2  # no command: help, exit status 2


@pytest.mark.parametrize("preset", IN_TESTS)
def test_encoder_info_works_for_every_preset(capsys, preset):
    assert main(["encoder", "info", f"lipsim:{preset}"]) == 0
    out = capsys.readouterr().out
    config = get_preset(preset)
    fields = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert fields["name"] == f"lipsim:{preset} (random weights)"
    assert fields["dim"] == str(config.embed_dim + 1)
    assert fields["input_size"] == str(config.input_size)
    assert fields["lipschitz"] == "1.0"
    assert fields["parameters"].startswith(f"{config.num_params():,} ")
    if preset == "small":
        assert "(63.3M)" in fields["parameters"]


def test_encoder_info_json_and_pixels(capsys):
    assert main(["encoder", "info", "--json", "lipsim:cpu-tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dim"] == 33 and info["lipschitz"] == 1.0 and info["preset"] == "cpu-tiny"
    assert info["weights"].startswith("random")
    assert main(["encoder", "info", "pixels"]) == 0
    out = capsys.readouterr().out
    assert "3073" in out and "parameters  0 " in out


def test_encoder_list_names_presets_and_pixels(capsys):
    assert main(["encoder", "list"]) == 0
    lines = capsys.readouterr().out.split()
    for preset in list_presets():
        assert f"lipsim:{preset}" in lines
    assert "pixels" in lines


def test_encoder_info_unknown_spec_is_an_error_not_a_traceback(capsys):
    assert main(["encoder", "info", "lipsim:no-such-thing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("robret: error:") and "cpu-tiny" in err


def test_lipsim_speed_script_runs_and_writes_json(tmp_path, capsys):
    from benchmarks.lipsim_speed import main as speed_main

    out = tmp_path / "speed.json"
    assert speed_main(["--presets", "cpu-tiny", "--rounds", "1", "--min-seconds", "0.01", "--train-batch", "2",
                       "--infer-batch", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["preset"] == "cpu-tiny" and result["meta"]["weights"] == "random"
    assert {"train", "infer-unfolded", "infer-folded"} <= set(row["images_per_s"])
    assert row["max_abs_diff_vs_unfolded"]["infer-folded"] <= 1e-5
    assert "| cpu-tiny | 32 |" in capsys.readouterr().out
