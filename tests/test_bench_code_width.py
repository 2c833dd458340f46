"""benchmarks/code_width.py --quick: both kernels run side by side, the 4-bit prototype computes what it states."""
import pytest

from benchmarks.code_width import main


def test_code_width_quick_report(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "cw")])
    row = report["rows"][0]
    assert row["bytes_per_vector"] == {"int8": 137, "4-bit": 73}
    assert row["four_bit_max_abs_error_vs_float64"] < 1e-5  # (sums of 130 terms of size ≤ 8·|q_i|, scale ≤ 0.01)
    assert set(row["median_ms"]) == {f"{k} {w} {t}" for k in ("int8", "4-bit") for w in ("scan", "floor")
                                     for t in (1, 2)}
    assert all(v > 0 for v in row["median_ms"].values())
    assert row["two_thread_ratio_int8_over_4bit"] == pytest.approx(row["median_ms"]["int8 scan 2"]
                                                                   / row["median_ms"]["4-bit scan 2"])
    assert (tmp_path / "cw.md").read_text().count("| 50,000 |") == 2
