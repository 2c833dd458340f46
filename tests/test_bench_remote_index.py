"""The local-vs-S3 index speed benchmark runs end to end in --quick mode (figures: docs/benchmarks.md)."""
from __future__ import annotations

import json

import pytest


def test_remote_index_speed_quick_builds_the_same_images_from_a_folder_and_from_loopback_s3(tmp_path):
    pytest.importorskip("moto.server")
    from benchmarks.remote_index_speed import main

    report = main(["--quick", "--out", str(tmp_path / "remote")])
    assert report["images"] == 16
    for side in ("local", "s3"):
        run = report["build"][side]["runs"][0]
        assert run["embedded"] == 16 and run["failed"] == 0 and run["images_per_s"] > 0
        assert report["read_only"][side]["files"] == 16
    assert report["read_only"]["local"]["mb"] == report["read_only"]["s3"]["mb"]
    assert json.loads((tmp_path / "remote.json").read_text()) == report
    assert "S3 (moto, loopback)" in (tmp_path / "remote.md").read_text()
