"""Where a benchmark's figures go: PREFIX.json (the data), PREFIX.md (the table, also printed) and,
for a benchmark that draws one, PREFIX.png (the plot)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence


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


def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
              title: str, log_y: bool = False) -> None:
    """One line per `series` item (label → (x, y)) in a 7×4 in PNG at `path`; y from 0 unless `log_y`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, ".-", ms=3, lw=0.8, label=label)
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
