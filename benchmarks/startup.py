"""Start-up time of robret commands, before and after the lazy imports, side by side in one run.

Each command runs in a fresh process (`python -m retrieval.cli …`), alternately from two source trees:
`before` (a git revision, extracted with `git archive`: by default the commit this work started from) and
`after` (this working tree), `--repeat` times each; the table shows the median wall time per command and
whether the process imported torch and faiss (read from `sys.modules` at exit by a small wrapper). For
reference: a process that only imports torch, the floor of any command that runs a model.

    python -m benchmarks.startup [--quick] [--before REV|none] [--repeat N] [--out benchmarks/results/startup]

The gallery is built once with the after tree (lipsim:demo, a few bundled photos); `index stats`,
`index verify` and `query` read it from both trees. --quick: one repetition, after tree only, two photos.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._output import write_report

ROOT = Path(__file__).resolve().parents[1]
BASE_REVISION = "cd0db51"  # main when this work began (issue 14): the "before" of the table
WRAPPER = ("import json, os, runpy, sys\n"
           "sys.argv = ['robret', *sys.argv[1:]]\n"
           "code = 0\n"
           "try:\n"
           "    from retrieval.cli import main\n"
           "    code = main()\n"
           "except SystemExit as e:\n"
           "    code = e.code or 0\n"
           "sys.stdout.flush()\n"
           "os.write(2, ('\\nSTARTUP ' + json.dumps({'rc': code, 'torch': 'torch' in sys.modules,"
           " 'faiss': 'faiss' in sys.modules}) + '\\n').encode())\n"
           "os._exit(code if isinstance(code, int) else 1)\n")


def commands(index_dir: Path, image: Path, quick: bool) -> dict[str, list[str]]:
    """name → argv (the index directory positional: both trees accept it)."""
    cmds = {"--help": ["--help"], "index stats": ["index", "stats", str(index_dir)]}
    if not quick:
        cmds.update({"index verify": ["index", "verify", str(index_dir)],
                     "index verify --deep": ["index", "verify", str(index_dir), "--deep"],
                     "encoder list": ["encoder", "list"],
                     "weights list": ["weights", "list"],
                     "query (1 image, k=10)": ["query", str(image), "--index-dir", str(index_dir), "--cpu"]})
    return cmds


AFTER_ONLY = {"index verify --deep"}  # options the before tree does not have


def run_once(tree: Path, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t
    facts = next((json.loads(line[8:]) for line in done.stderr.splitlines() if line.startswith("STARTUP ")),
                 {"rc": done.returncode, "torch": None, "faiss": None})
    if facts["rc"] not in (0, None):
        raise RuntimeError(f"{' '.join(argv)} failed in {tree}: {done.stderr[-500:]}")
    return {"wall_s": wall, **facts}


def torch_import(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
    return time.perf_counter() - t


def extract(revision: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repetition, after tree only, two commands")
    p.add_argument("--before", default=None, help=f"git revision to compare with (default {BASE_REVISION}; "
                   "none: after only)")
    p.add_argument("--repeat", type=int, default=None, help="runs per command and tree (default 5; quick 1)")
    p.add_argument("--out", default="benchmarks/results/startup", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    before = args.before or ("none" if args.quick else BASE_REVISION)
    from encoder.samples import export_sample_photos

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"after": ROOT}
        if before != "none":
            (tmp / "before").mkdir()
            trees = {"before": extract(before, tmp / "before"), "after": ROOT}
        photos = tmp / "photos"
        export_sample_photos(photos)
        keep = sorted(photos.iterdir())[: 2 if args.quick else 6]
        for extra in sorted(set(photos.iterdir()) - set(keep)):
            extra.unlink()
        index_dir = tmp / "index"
        subprocess.run([sys.executable, "-m", "retrieval.cli", "index", "build", str(photos), "--index-dir",
                        str(index_dir), "--cpu", "--no-progress"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, check=True, capture_output=True)
        cmds = commands(index_dir, keep[0], args.quick)
        runs: dict[str, dict[str, list[dict]]] = {name: {t: [] for t in trees} for name in cmds}
        floor = {t: [] for t in trees}
        for _ in range(repeat):  # alternate trees and commands: both see the same machine load
            for name, argv_ in cmds.items():
                for t, tree in trees.items():
                    if not (t == "before" and name in AFTER_ONLY):
                        runs[name][t].append(run_once(tree, argv_))
            if not args.quick:
                for t, tree in trees.items():
                    floor[t].append(torch_import(tree))
    rows = []
    for name, by_tree in runs.items():
        row = {"command": name}
        for t, rs in by_tree.items():
            if not rs:
                continue
            row[t] = {"median_s": statistics.median(r["wall_s"] for r in rs), "runs": [r["wall_s"] for r in rs],
                      "imports_torch": rs[-1]["torch"], "imports_faiss": rs[-1]["faiss"]}
        rows.append(row)
    report = {"repeat": repeat, "before": before, "python": sys.version.split()[0], "cpus": os.cpu_count(),
              "import_torch_s": statistics.median(floor["after"]) if floor["after"] else None, "commands": rows}
    return write_report(args.out, report, markdown(report))


def markdown(report: dict) -> str:
    trees = [t for t in ("before", "after") if t in report["commands"][0]]
    head = "| command | " + " | ".join(f"{t}: median s (torch, faiss imported)" for t in trees) + " |"
    lines = [head, "|---|" + "---|" * len(trees)]
    for row in report["commands"]:
        cells = [f"{row[t]['median_s']:.2f} ({'yes' if row[t]['imports_torch'] else 'no'}, "
                 f"{'yes' if row[t]['imports_faiss'] else 'no'})" if t in row else "–" for t in trees]
        lines.append(f"| `robret {row['command']}` | " + " | ".join(cells) + " |")
    if report["import_torch_s"] is not None:
        lines.append(f"\n`python -c 'import torch'` alone: {report['import_torch_s']:.2f} s (median of "
                     f"{report['repeat']}); {report['cpus']} CPUs, Python {report['python']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
