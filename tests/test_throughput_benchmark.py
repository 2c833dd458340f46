"""benchmarks/throughput.py: analytical FLOPs against hand-computed values, and a quick run."""
from __future__ import annotations

import json

from benchmarks.throughput import dreamsim_flops, lipsim_flops, main, vit_flops
from encoder import get_preset


def test_vit_b16_flops_match_the_published_count():
    # ViT-B/16 at 224: 17.56 GMACs (timm/fvcore count, matrix products only)
    assert abs(vit_flops(16) / 2 - 17.56e9) / 17.56e9 < 0.01


def test_lipsim_small_flops_by_hand():
    conv = 20 * 2 * (224 * 224 * 5 * 45 * 9)  # conv2d and conv_transpose2d per layer
    dense = 7 * 2 * (45 * 14 * 14 * 1024)
    assert lipsim_flops(get_preset("small"))["per_image"] == 2 * (conv + dense)


def test_ensemble_flops_are_the_sum_of_its_three_branches():
    parts = dreamsim_flops("dino_vitb16") + dreamsim_flops("clip_vitb16") + dreamsim_flops("open_clip_vitb16")
    assert dreamsim_flops("ensemble") == parts
    assert 12 < dreamsim_flops("ensemble") / lipsim_flops(get_preset("small"))["per_image"] < 13


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    assert main(["--quick", "--presets", "cpu-tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert result["weights"] == "random"
    assert {(r["model"], r["mode"]) for r in result["table"]} == {("lipsim:cpu-tiny", "train-form"),
                                                                  ("lipsim:cpu-tiny", "folded")}
    assert all(r["images_per_s"] > 0 for r in result["table"])
    assert "| lipsim:cpu-tiny | folded |" in (tmp_path / "throughput.md").read_text()
