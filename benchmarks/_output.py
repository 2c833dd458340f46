"""Where a benchmark's figures go: PREFIX.json (the data), PREFIX.md (the table, also printed) and,
for a benchmark that draws one, PREFIX.png (the plot); and `child_json`, the figures of a measuring child
process."""
from __future__ import annotations

import json
import subprocess
import sys
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


def child_json(code: str, args: Sequence[str], cwd: str | Path, what: str) -> dict:
    """Run `python -c code *args` in `cwd` (a fresh process, for figures one process must not share with
    another) and return its last line of output parsed as JSON; RuntimeError naming `what`, with the end
    of its stderr, when it fails (a negative status is the signal that killed it)."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{what} failed (exit status {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
