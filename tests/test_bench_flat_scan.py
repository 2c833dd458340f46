"""The flat-scan benchmark runs end to end in --quick mode (its figures are in docs/benchmarks.md)."""
from __future__ import annotations

import json


def test_flat_scan_benchmark_quick_times_both_searches_on_the_same_queries(tmp_path, monkeypatch):
    import index.ivf as ivf
    from benchmarks.flat_scan import main

    monkeypatch.setattr(ivf, "SPLIT_MIN", 2_000)  # so that the 20k quick gallery is split (over 3 threads)
    monkeypatch.setattr(ivf, "_threads", lambda: 3)

    report = main(["--quick", "--out", str(tmp_path / "fs")])
    (row,) = report["sizes"]
    assert row["n"] == 20_000 and row["m"] == 74 and row["queries"] == 20
    assert row["same_ids"] == 20  # random unit vectors: no ties at the m-th score
    assert row["max_score_difference"] <= row["float32_error_bound"]
    assert min(row[name]["p50_ms"] for name in ("faiss", "faiss-1-thread", "store", "store-1-thread")) > 0
    assert row["faiss/store"] > 0 and row["faiss-1-thread/store"] > 0 and row["store-1-thread/store"] > 0
    assert row["split_same_answer"] == 20  # the scan split over threads answers bit for bit as on one thread
    assert json.loads((tmp_path / "fs.json").read_text()) == report
    assert "| 20,000 |" in (tmp_path / "fs.md").read_text()
