"""benchmarks/certificate_modes.py --quick: the per-mode tightness figures the closing note quotes, in small."""
from __future__ import annotations

import json

from benchmarks import certificate_modes


def test_quick_run_never_breaks_the_stated_radius_and_breaks_the_rgb_only_one_for_non_rgb_modes(tmp_path):
    assert certificate_modes.main(["--quick", "--out", str(tmp_path / "modes")]) == 0
    rows = json.loads((tmp_path / "modes.json").read_text())["rows"]
    assert {r["layout"] for r in rows} == set(certificate_modes.LAYOUTS)
    for r in rows:
        assert r["break_x_after"] >= 1.0, r  # no attack succeeds inside the radius robret states
        if r["factor"] > 1.5:  # grey, grey+alpha, RGBA, CMYK: the first landing's radius was too large
            assert r["break_x_before"] < 1.0, r
    assert "| tight | L |" in (tmp_path / "modes.md").read_text()
