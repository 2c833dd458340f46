"""benchmarks/gallery_certified.py --quick: certified search over a mapped IVF gallery's FAISS lists runs,
visits at most every list, and reports consistent figures, beside a Flat gallery of the same vectors
searched the same way (both exhaustive certificates: the same answers), for queries from the clusters and for
gallery items as queries."""
from __future__ import annotations

import json

from benchmarks.gallery_certified import main


def test_gallery_certified_quick_report(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "gc")])
    row = report["row"]
    assert row["n"] == 20_000 and row["queries"] == 5 and row["same_answers"]
    after = row["after"]
    assert 0 < after["p50_ms"] <= after["p95_ms"] and 0 < after["lists_visited_median"] <= row["nlist"]
    assert json.loads((tmp_path / "gc.json").read_text())["row"]["nlist"] == row["nlist"]
    flat = row["after_flat"]
    assert 0 < flat["p50_ms"] <= flat["p95_ms"] and after["exhaustive"] == 5 and row["ivf_over_flat_p50"] > 0
    if flat["exhaustive"] == 5:  # the flat path's first candidates sufficed: the same certificate
        assert row["flat_same_answers"]
    text = (tmp_path / "gc.md").read_text()
    assert "| after: IVF |" in text and "| after: the same vectors as Flat |" in text
    # Gallery items asked as they are: each one's own top-1, certified exhaustively from a short list.
    items = row["gallery_items"]
    assert items["after"]["exhaustive"] == 5 and 0 < items["after"]["p50_ms"] <= items["after"]["p95_ms"]
    assert "Gallery items as queries" in text
    for r in (row, items):  # the Flat gallery with int8 codes: the same answers, all exhaustive
        assert r["codes_same_answers"] and r["after_codes"]["exhaustive"] == 5 and r["flat_over_codes_p50"] > 0
    assert "| after: Flat with int8 codes" in text
