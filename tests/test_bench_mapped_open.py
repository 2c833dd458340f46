"""benchmarks/mapped_open.py --quick: both readers of the same live set answer identically (the script
checks it), the live row count follows the tombstones, and the mapped reader keeps less memory of its own."""
from __future__ import annotations

import json

from benchmarks.mapped_open import main


def test_mapped_open_quick_report(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "mo")])
    (row,) = report["rows"]
    assert row["rows_live"] == 20_000 - 3 * 1000 and row["files"] == 4
    assert row["bytes"] > 20_000 * 129 * 4
    assert row["mapped"]["anon_bytes"] < row["copied"]["anon_bytes"] / 2
    assert json.loads((tmp_path / "mo.json").read_text())["rows"][0]["n"] == 20_000
    assert "| 17,000 |" in (tmp_path / "mo.md").read_text()
