"""benchmarks/mapped_open.py --quick: both readers of the same live set answer identically (the script
checks it), the live row count follows the tombstones, and the mapped reader keeps less memory of its own."""
from __future__ import annotations

import json

from benchmarks.mapped_open import main


def test_mapped_open_quick_report(tmp_path):
    report = main(["--quick", "--kinds", "flat", "ivf", "flat-base", "ivf-segments", "--before", "HEAD",
                   "--out", str(tmp_path / "mo")])
    flat, ivf, base, layered = report["rows"]
    # an IVF base with segments: the base's lists mapped, the segments layered on them (same exact answers)
    assert layered["kind"].startswith("IVF") and layered["files"] == 4 and layered["rows_live"] == 17_000
    assert layered["mapped"]["anon_bytes"] < layered["copied"]["anon_bytes"] / 2
    assert base["kind"] == "Flat" and base["files"] == 1 and base["rows_live"] == 20_000
    assert flat["kind"] == "Flat" and flat["rows_live"] == 20_000 - 3 * 1000 and flat["files"] == 4
    assert ivf["kind"].startswith("IVF") and ivf["rows_live"] == 20_000 and ivf["files"] == 1
    for row in (flat, ivf, base):
        assert row["bytes"] > row["rows_live"] * 129 * 4
        assert row["mapped"]["anon_bytes"] < row["copied"]["anon_bytes"] / 2
        assert row["before"]["p50_ms"] > 0  # the committed tree's mapped reader ran beside (same answers: checked)
    assert json.loads((tmp_path / "mo.json").read_text())["rows"][0]["n"] == 20_000
    text = (tmp_path / "mo.md").read_text()
    assert "| Flat | 17,000 |" in text and "The mapped reader of HEAD (before)" in text and "| Flat | 1 | 20,000 |" in text
