"""The segments benchmark runs end to end in --quick mode (its figures are in docs/benchmarks.md)."""
from __future__ import annotations

import json


def test_segments_benchmark_quick_compares_whole_rewrites_with_appended_segments(tmp_path):
    from benchmarks.segments import main

    report = main(["--quick", "--out", str(tmp_path / "segments")])
    before, after = report["before"], report["after"]
    assert len(before) == len(after) == report["checkpoints"] == 8
    assert [r["vectors"] for r in before] == [r["vectors"] for r in after] == [50 * (i + 1) for i in range(8)]
    row_bytes = 8 + 4 * report["dim"]  # an id and a float32 vector
    # before: every checkpoint rewrites the whole index; after: a base once, then only the batch's rows
    assert all(r["kind"] == "faiss" and r["bytes_written"] >= r["vectors"] * 4 * report["dim"] for r in before)
    assert after[0]["kind"] == "faiss" and all(r["kind"] == "rows" for r in after[1:])
    assert all(r["bytes_written"] == 28 + 50 * row_bytes for r in after[1:])
    assert report["total_bytes_written"]["before"] > 4 * report["total_bytes_written"]["after"]
    assert report["same_ids_and_vectors"] is True and report["compact"]["files_before"] == 8
    assert json.loads((tmp_path / "segments.json").read_text()) == report
    assert "segment appended" in (tmp_path / "segments.md").read_text()
