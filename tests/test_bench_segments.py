"""The segments benchmark runs end to end in --quick mode (its figures are in docs/benchmarks.md)."""
from __future__ import annotations

import json


def test_segments_benchmark_quick_compares_whole_rewrites_appended_and_tiered_segments(tmp_path):
    from benchmarks.segments import main

    report = main(["--quick", "--out", str(tmp_path / "segments")])
    before, appended, tiered = report["before"], report["appended"], report["after"]
    assert len(before) == len(appended) == len(tiered) == report["checkpoints"] == 8
    assert [r["vectors"] for r in before] == [r["vectors"] for r in tiered] == [50 * (i + 1) for i in range(8)]
    row_bytes = 8 + 4 * report["dim"]  # an id and a float32 vector
    # before: every checkpoint rewrites the whole index; appended: a base once, then only the batch's rows
    assert all(r["kind"] == "faiss" and r["bytes_written"] >= r["vectors"] * 4 * report["dim"] for r in before)
    assert appended[0]["kind"] == "faiss" and all(r["kind"] == "rows" for r in appended[1:])
    assert all(r["bytes_written"] == 28 + 50 * row_bytes for r in appended[1:])
    # tiered, a binary counter of batches: live sets [1], [1,1], [3], [3,1], [3,2], [3,2,1], [7], [7,1]
    assert [r["kind"] for r in tiered] == ["faiss", "rows", "faiss", "rows", "rows", "rows", "faiss", "rows"]
    assert [r["live_files"] for r in tiered] == [1, 2, 1, 2, 2, 3, 1, 2]
    assert tiered[4]["bytes_written"] == 28 + 100 * row_bytes  # the merged segment: two batches
    total = report["total_bytes_written"]
    assert total["before"] > 2 * total["after"] > 2 * total["appended"]
    assert report["most_live_files"] == {"before": 1, "appended": 8, "after": 3}
    assert report["same_ids_and_vectors"] is True and report["compact"]["files_before"] == 2
    assert json.loads((tmp_path / "segments.json").read_text()) == report
    md = (tmp_path / "segments.md").read_text()
    assert "size-tiered" in md and "mean of the first → last tenth" in md
    assert (tmp_path / "segments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segments_benchmark_runs_a_chosen_width_and_subset_of_policies(tmp_path, monkeypatch):
    import index
    from benchmarks.segments import main, tenths

    specs = []
    real_build = index.build_index

    def recording_build(folder, index_dir, encoder_spec=None, **kwargs):  # the real build, its spec noted
        specs.append(encoder_spec)
        return real_build(folder, index_dir, encoder_spec, **kwargs)

    monkeypatch.setattr(index, "build_index", recording_build)
    report = main(["--quick", "--pixels", "2", "--policies", "appended", "after", "--out", str(tmp_path / "s")])
    assert report["dim"] == 3 * 2 * 2 + 1 and report["policies"] == ["appended", "after"] and "before" not in report
    assert report["compacted"] == "after" and report["same_ids_and_vectors"] is True
    assert specs == ["pixels:2", "pixels:2"]  # the width asked for is what each gallery records
    rows = [r for r in report["appended"] if r["kind"] == "rows"]
    assert tenths(report["appended"]) == (rows[0]["seconds"], rows[-1]["seconds"])  # 7 segments: a tenth is one
    md = (tmp_path / "s.md").read_text()
    assert "whole index rewritten" not in md and md.count("| 50 vectors |") == 1
