"""The catalog-commit benchmark runs end to end in --quick mode (its figures are in docs/benchmarks.md)."""
from __future__ import annotations

import json


def test_catalog_commit_benchmark_quick_commits_the_same_rows_to_every_catalog(tmp_path):
    from benchmarks.catalog_commit import VARIANTS, main
    from index.catalog import WRITER_CACHE_KIB

    report = main(["--quick", "--out", str(tmp_path / "cc")])
    assert report["rows"] == 6 * 300 and report["shipped_cache_size"] == -WRITER_CACHE_KIB
    for v in VARIANTS:
        assert report["counts"][v] == {"indexed": 1800, "failed": 0, "removed": 0}
        assert len(report["seconds"][v]) == 6 and len(report["tenths"][v]) == 6  # a tenth of 6 is one batch
        assert abs(report["total_seconds"][v] - sum(report["seconds"][v])) < 1e-9
    # an index on content_hash takes space, all 64 characters more than a prefix, none least
    sizes = report["bytes_on_disk"]
    assert sizes["no-hash-index"] < sizes["shipped"] < sizes["hex-index"]
    assert json.loads((tmp_path / "cc.json").read_text()) == report
    assert "| **all commits** |" in (tmp_path / "cc.md").read_text()
    assert (tmp_path / "cc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tenth_means_average_consecutive_tenths():
    from benchmarks.catalog_commit import tenth_means

    assert tenth_means([1.0] * 10) == [1.0] * 10
    assert tenth_means(list(range(20))) == [0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5, 16.5, 18.5]
    assert tenth_means([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert tenth_means(list(range(11))) == [0.5, 2.5, 4.5, 6.5, 8.5, 10.0]


def test_catalog_commit_benchmark_quick_beside_a_postgres_catalog(tmp_path, postgres_server):
    # (postgres_server: skipped where no server can be had; the benchmark starts its own, fsync on)
    from benchmarks.catalog_commit import main

    report = main(["--quick", "--postgres", "--out", str(tmp_path / "cc")])
    assert report["variants"][-1] == "postgres" and len(report["seconds"]["postgres"]) == 6
    assert report["counts"]["postgres"] == report["counts"]["shipped"] == {"indexed": 1800, "failed": 0, "removed": 0}
    assert report["bytes_on_disk"]["postgres"] > 0
    assert (tmp_path / "cc.md").read_text().splitlines()[0].endswith("| postgres |")
