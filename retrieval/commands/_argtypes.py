"""argparse `type=` callables for numbers with a valid range (a bad value exits 2 with a message), and the one
`--index-dir DIR` argument every command that reads an index takes."""
from __future__ import annotations

import argparse
import math
import os

__all__ = ["UsageError", "INDEX_DIR_HELP", "index_dir_args", "index_dir_of", "positive_int", "nonnegative_int",
           "nonnegative_float", "pixel_eps", "check_linf_eps", "unit_interval"]


class UsageError(ValueError):
    """A command line that cannot be run as given (checked after parsing): the CLI prints it and exits 2."""


INDEX_DIR_HELP = "the index directory (made by `robret index build FOLDER --index-dir DIR`)"


def index_dir_args(p) -> None:
    """--index-dir DIR, and the older positional DIR, on a subcommand's parser (read them with `index_dir_of`)."""
    p.add_argument("index_dir_positional", nargs="?", metavar="DIR",
                   help="the index directory (deprecated spelling of --index-dir DIR)")
    p.add_argument("--index-dir", dest="index_dir_option", metavar="DIR", help=INDEX_DIR_HELP)


def index_dir_of(args) -> str:
    """The index directory, from --index-dir or the older positional DIR (both: they must agree)."""
    given = [d for d in (args.index_dir_option, args.index_dir_positional) if d is not None]
    if not given:
        raise UsageError("the index directory is required: --index-dir DIR")
    if len(given) == 2 and os.path.abspath(given[0]) != os.path.abspath(given[1]):
        raise UsageError(f"two index directories given: --index-dir {given[0]} and {given[1]}")
    return given[0]


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}" if low else f"{value} must be ≥ 0")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer ≥ 0."""
    return _int_at_least(text, 0)


def unit_interval(text: str) -> float:
    """A number in [0, 1] (e.g. a cosine-similarity threshold)."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return value


def _nonnegative(value: float, text: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number ≥ 0")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return _nonnegative(value, text)


def pixel_eps(text: str) -> float:
    """A perturbation budget in [0, 1] pixel units, written as a decimal (`0.03`) or a fraction (`8/255`).

    Both forms give the same number: `8/255` = 0.0313… For ℓ∞ a budget above 1 is meaningless (every
    sample lies in [0, 1]); callers that take ℓ∞ budgets reject it (see `check_linf_eps`)."""
    num, sep, den = text.partition("/")
    try:
        value = float(num) / float(den) if sep else float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction such as 8/255") from None
    except ZeroDivisionError:
        raise argparse.ArgumentTypeError(f"{text!r} divides by zero") from None
    return _nonnegative(value, text)


def check_linf_eps(value: float) -> None:
    """Refuse an ℓ∞ budget above 1 in [0, 1] pixel units (e.g. `--eps 8` meant as 8/255)."""
    if value > 1:
        raise ValueError(f"an ℓ∞ budget of {value:g} exceeds the [0, 1] pixel range: write 8/255 (or 0.031) "
                         f"for eight grey levels")
