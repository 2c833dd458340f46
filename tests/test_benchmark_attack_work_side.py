"""benchmarks/attack_work_side.py --quick: the full image vs a shrunk working copy, in small."""
from __future__ import annotations

import json

from benchmarks import attack_work_side


def test_quick_run_measures_both_and_every_attack_stays_in_budget_with_its_certificate(tmp_path, capsys):
    out = tmp_path / "sides.json"
    assert attack_work_side.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"0", "96"} and result["set_radius"] > 0
    for run in result["runs"].values():
        assert run["delta_l2"] <= result["eps"] * (1 + 1e-6) and run["certificate_ok"] and run["seconds"] > 0
    assert "| a 96-px copy |" in capsys.readouterr().out
