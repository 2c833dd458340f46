"""The start-up and bulk-query benchmarks run end to end in --quick mode (their figures are in docs/benchmarks.md)."""
from __future__ import annotations

import json


def test_startup_benchmark_quick_times_light_commands_without_torch(tmp_path):
    from benchmarks.startup import main

    report = main(["--quick", "--out", str(tmp_path / "startup")])
    rows = {r["command"]: r["after"] for r in report["commands"]}
    assert set(rows) == {"--help", "index stats"}
    assert all(r["median_s"] > 0 and r["imports_torch"] is False and r["imports_faiss"] is False for r in rows.values())
    assert json.loads((tmp_path / "startup.json").read_text()) == report
    assert "`robret index stats`" in (tmp_path / "startup.md").read_text()


def test_bulk_query_benchmark_quick_compares_one_process_with_one_per_query(tmp_path):
    from benchmarks.bulk_query import main

    report = main(["--quick", "--out", str(tmp_path / "bulk")])
    assert report["queries"] == 4 and report["one_process_per_query"]["processes"] == 1
    # 4 queries in one process cost one start-up; 1 query per process pays it every time.
    assert report["speedup_bulk_process_vs_one_per_query"] > 1
    assert report["bulk_in_process"]["queries_per_s"] > report["bulk_process"]["queries_per_s"]
    assert (tmp_path / "bulk.md").read_text().startswith("| 4 certified top-10 queries")
