"""The `robret` command line. Each area adds its subcommands from its own module.

A command module exposes `register(subparsers)`; it adds parsers whose `func(args) -> int` runs the
command. Library code raises typed exceptions; only this layer prints them and sets the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = [
    "retrieval.commands.encoder_cmd",
    "retrieval.commands.demo_cmd",
    "retrieval.commands.train_cmd",
    "retrieval.commands.index_cmd",
    "retrieval.commands.attack_cmd",
    "retrieval.commands.ui_cmd",
    "retrieval.commands.serve_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robret",
        description="Robust image retrieval: index image folders, search them with LipSim (a 1-Lipschitz "
        "perceptual metric whose top-k results carry certified radii), attack queries, compare with DreamSim.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for provenance records
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"robret: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
