"""Where a benchmark's figures go: PREFIX.json (the data), PREFIX.md (the table, also printed) and,
for a benchmark that draws one, PREFIX.png (the plot)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_report(prefix: str | Path, report: dict, table: str,
                 plot: Callable[[dict, Path], None] | None = None) -> dict:
    """Write `report` to PREFIX.json and `table` (Markdown) to PREFIX.md, print the table, draw
    `plot(report, PREFIX.png)` when given; return the report."""
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    if plot is not None:
        plot(report, out.with_suffix(".png"))
    return report
