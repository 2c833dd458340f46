"""The `robret` command line. Each area adds its subcommands from its own module.

A command module exposes `register(subparsers)`; it adds parsers whose `func(args) -> int` runs the
command. Library code raises typed exceptions; only this layer prints them and sets the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from retrieval.commands._argtypes import UsageError

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = [
    "retrieval.commands.encoder_cmd",
    "retrieval.commands.weights_cmd",
    "retrieval.commands.demo_cmd",
    "retrieval.commands.train_cmd",
    "retrieval.commands.index_cmd",
    "retrieval.commands.attack_cmd",
    "retrieval.commands.dedup_cmd",
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


def _names_as_stored_on_stdout() -> None:
    """A file name that is not UTF-8 (say a Latin-1 "caf\\xe9.png") reaches Python as text holding surrogates. On a
    strict UTF-8 stdout (a desktop locale such as en_US.UTF-8) printing it fails, so `robret query`'s table, CSV
    and --paths-only stopped at the first such hit. Written with surrogateescape, the name comes out as the bytes
    the file system holds, as `ls` or `find` print it, whatever the locale (JSON escapes it instead:
    index.scan.shown_path). A process setting of the command-line program, not of the library."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # (a stream that cannot change its error handler now)
            pass


def _return_large_frees_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free (up to 32 MB), after which large buffers
    come from per-thread heaps that are rarely returned to the OS: decode workers handling very large
    images then grow the process by hundreds of MB. A fixed 1 MB threshold keeps every large buffer
    (decoded images, sample arrays) in its own mapping, returned on free. Measured on a build over four
    64-megapixel PNGs with 4 workers: peak RSS 2126 MB → 1592 MB (benchmarks/decode_memory.py).
    A process setting of the command-line program, not of the library."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def main(argv: list[str] | None = None) -> int:
    _return_large_frees_to_the_os()
    _names_as_stored_on_stdout()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for provenance records
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`| head`) shows up here, while it can still be handled
        return code
    except BrokenPipeError:
        # The reader left (`robret … --json | head`): exit as a SIGPIPE'd program would, quietly;
        # stdout goes to /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"robret: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"robret: error: {exc}", file=sys.stderr)
        return 1


def run() -> None:
    """The console entry point: `main()`, then exit without the interpreter's module teardown.

    Tearing torch's modules down at exit costs ~0.3 GB of memory and ~1 s on every command (`python -c
    "import torch"` peaks at 1.19 GB with it, 0.92 GB without). Everything robret writes is closed by
    then (context managers, atomic writers); the atexit handlers (logging, tqdm, any library's cleanup)
    still run, then the process leaves with main's exit code.
    """
    import atexit

    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass
    atexit._run_exitfuncs()  # noqa: SLF001 — the public way (sys.exit) would also tear modules down
    os._exit(code)


if __name__ == "__main__":
    run()
