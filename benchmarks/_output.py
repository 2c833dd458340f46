"""Where a benchmark's figures go: PREFIX.json (the data) and PREFIX.md (the table), also printed."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(prefix: str | Path, report: dict, table: str) -> dict:
    """Write `report` to PREFIX.json and `table` (Markdown) to PREFIX.md, print the table, return the report."""
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    return report
