"""benchmarks/mapped_open.py --quick: both readers of the same live set answer identically (the script
checks it), the live row count follows the tombstones, and the mapped reader keeps less memory of its own."""
from __future__ import annotations

import json

from benchmarks.mapped_open import main


def test_mapped_open_quick_report(tmp_path):
    report = main(["--quick", "--kinds", "flat", "ivf", "--out", str(tmp_path / "mo")])
    flat, ivf = report["rows"]
    assert flat["kind"] == "Flat" and flat["rows_live"] == 20_000 - 3 * 1000 and flat["files"] == 4
    assert ivf["kind"].startswith("IVF") and ivf["rows_live"] == 20_000 and ivf["files"] == 1
    for row in (flat, ivf):
        assert row["bytes"] > row["rows_live"] * 129 * 4
        assert row["mapped"]["anon_bytes"] < row["copied"]["anon_bytes"] / 2
    assert json.loads((tmp_path / "mo.json").read_text())["rows"][0]["n"] == 20_000
    assert "| Flat | 17,000 |" in (tmp_path / "mo.md").read_text()
