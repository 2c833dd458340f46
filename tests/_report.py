"""Numbers the audit and soundness tests measure, printed in pytest's terminal summary (conftest.py).

Tests assert on what they measure; this record only shows the figures (largest Jacobian norms,
radius multiples at which attacks succeed) after the run, at any verbosity but -q.
"""
from __future__ import annotations

MEASURED: dict[str, dict[str, float]] = {}


def note(section: str, key: str, value) -> None:
    """Record `value` under section/key (the last one recorded wins)."""
    MEASURED.setdefault(section, {})[key] = float(value)


def note_max(section: str, key: str, value) -> None:
    """Record the largest `value` seen under section/key."""
    table = MEASURED.setdefault(section, {})
    table[key] = max(table.get(key, float("-inf")), float(value))
