"""The page's default-attack contrast benchmark runs end to end in --quick mode on the UI tests' page
(random tiny encoders; its figures for the bundled models are in docs/ui.md)."""
from __future__ import annotations

import json


def test_ui_contrast_quick_attacks_both_encoders_and_checks_the_certificate(ui_env, tmp_path):
    from benchmarks.ui_contrast import main

    report = main(["--quick", "--demo-encoder", ui_env["ROBRET_UI_DEMO_ENCODER"], "--compare",
                   ui_env["ROBRET_UI_COMPARE"], "--cache-dir", ui_env["ROBRET_UI_CACHE_DIR"],
                   "--out", str(tmp_path / "contrast")])
    rows = report["rows"]
    assert report["queries"] == len(rows) == 3 and report["attack"]["steps"] == 2
    for r in rows:
        lip, cmp_ = r["lipsim"], r["compare"]
        assert "set_radius" not in cmp_  # no Lipschitz bound, no certificate
        assert lip["certified"] == (lip["delta_l2"] < lip["set_radius"]) and lip["ok"]
        assert lip["delta_l2"] <= report["attack"]["eps"] * (1 + 1e-4)  # float32 projection
        if lip["certified"]:
            assert not lip["changed"]  # what the certificate promised, checked on the attacked query
        assert cmp_["changed"] == (cmp_["overlap"] < 1)
    s = report["summary"]
    assert s["compare_changed"] == sum(r["compare"]["changed"] for r in rows) / 3
    assert s["lipsim_certified"] == sum(r["lipsim"]["certified"] for r in rows) / 3
    assert s["lipsim_violations"] == 0
    assert json.loads((tmp_path / "contrast.json").read_text()) == report
    assert "certificate violations: 0" in (tmp_path / "contrast.md").read_text()
