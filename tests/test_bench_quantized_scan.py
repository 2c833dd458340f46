"""benchmarks/quantized_scan.py --quick: the exact scan and the int8 codes give the same exhaustive answers."""
import json

from benchmarks.quantized_scan import main


def test_quantized_scan_quick_report(tmp_path):
    report = main(["--quick", "--work-dir", str(tmp_path), "--out", str(tmp_path / "qs")])
    (row,) = report["rows"]
    assert row["n"] == 50_000 and row["codes_mb"] > 0 and row["codes_build_s"] > 0
    for name in ("clusters", "items"):
        r = row[name]
        assert r["same_answers"] == 5 and r["flat"]["exhaustive"] == r["codes"]["exhaustive"] == 5
        assert 0 < r["codes"]["p50_ms"] <= r["codes"]["p95_ms"] and r["ratio_p50"] > 0
        assert 10 <= r["codes_listed_median"] < row["n"]
    stream = row["stream"]
    assert stream["gb_per_s"] > 0 and stream["floor_ms"] > 0 and stream["scan_bytes"] == 50_048 * (129 + 8)  # (rows padded to 64)
    append, change = row["reload"]["append"], row["reload"]["change"]
    assert row["files"]["files"] == 32 and row["files"]["many_files_p50_ms"] > 0 < row["files"]["one_file_p50_ms"]
    assert append["identical"] and append["reused"] == 50_000 and append["reuse_s"] > 0 and append["full_s"] > 0
    assert 0 < append["added_mb"] < append["full_mb"] / 2  # (the base's codes held once)
    assert change["identical"] and change["reused"] == 50_000 and change["rows_changed"] > 0  # (base shared, tombstoned)
    assert json.loads((tmp_path / "qs.json").read_text())["rows"][0]["n"] == 50_000
    assert "| 50,000 | gallery items |" in (tmp_path / "qs.md").read_text()
    assert not list(tmp_path.glob("robret-quantized-*"))  # the vectors file is removed
