"""The page's default attack on every gallery query: does the comparison encoder's top-k change while
LipSim's certified top-k holds? Measured through the page's own engine (ui/engine.py).

For each gallery photo used as the query (as the page's "pick from the gallery"), at the page's defaults
(untargeted top-k attack, ℓ2 ε = 0.5 over the query's own samples at full size, 20 PGD steps, k = 5;
ui/app.py), both encoders are attacked and the following are recorded per encoder: overlap@k before/after,
whether the top-k set changed, ‖δ‖₂; for LipSim also the clean top-k set radius (file space), whether
ε is inside it (the top-k set is then certified not to change) and the certificate's verdict.

    python -m benchmarks.ui_contrast                       # the demo gallery, lipsim:demo vs the page's default
    python -m benchmarks.ui_contrast --quick               # 3 queries, 2 steps (a test runs it)
Writes benchmarks/results/ui_contrast.json and .md (--out PREFIX).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from benchmarks._output import write_report

ROOT = Path(__file__).resolve().parent.parent


def run(cfg, queries: int | None, eps: float, steps: int, k: int) -> dict:
    import torch

    from ui.engine import AttackSpec, Engine
    from ui.query import query_pixels

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    engine = Engine(cfg)
    spec = AttackSpec("untargeted", "l2", eps, steps, k)
    rows = []
    for item in engine.gallery[:queries] if queries else engine.gallery:
        q = query_pixels(engine.image(item.id))
        results = engine.attack(q.x, spec, layout=q.layout, space=q.space)
        row = {"query": item.name, "size": list(q.original_hw)}
        for key, res in results.items():
            row[key] = {"encoder": res.label, "overlap": res.overlap, "changed": set(res.before.top) != set(res.after.top),
                        "delta_l2": res.delta_l2}
            if res.certificate is not None:
                row[key].update(set_radius=res.certificate["set_radius"], certified=res.certificate["within_radius"],
                                ok=res.certificate["ok"], verdict=res.certificate["verdict"])
        rows.append(row)
    n = len(rows)

    def share(key, field):
        return sum(bool(r[key].get(field)) for r in rows) / n

    return {"gallery": len(engine.gallery), "queries": n, "lipsim": engine.lipsim.label, "compare": engine.compare.label,
            "notes": list(engine.notes), "attack": {"kind": "untargeted", "norm": "l2", "eps": eps, "steps": steps, "k": k},
            "rows": rows,
            "summary": {"compare_changed": share("compare", "changed"), "lipsim_changed": share("lipsim", "changed"),
                        "lipsim_certified": share("lipsim", "certified"),
                        "lipsim_violations": sum(not r["lipsim"].get("ok", True) for r in rows),
                        "compare_mean_overlap": sum(r["compare"]["overlap"] for r in rows) / n,
                        "lipsim_mean_overlap": sum(r["lipsim"]["overlap"] for r in rows) / n}}


def table(report: dict) -> str:
    a, s = report["attack"], report["summary"]
    lines = [f"Default attack of the page: untargeted top-{a['k']}, ℓ2 ε = {a['eps']:g} over the query's samples, "
             f"{a['steps']} steps; {report['queries']} gallery photos as queries (gallery {report['gallery']}). "
             f"LipSim: {report['lipsim']}; comparison: {report['compare']}.", "",
             f"| query | {report['compare']}: overlap@{a['k']} after | {report['lipsim']}: overlap@{a['k']} after | "
             "LipSim top-k set radius (ε inside?) |", "|---|---|---|---|"]
    for r in report["rows"]:
        lip = r["lipsim"]
        radius = lip.get("set_radius")
        cert = "–" if radius is None else f"{radius:.3g} ({'yes' if lip['certified'] else 'no'})"
        lines.append(f"| {r['query']} | {r['compare']['overlap']:.0%} | {lip['overlap']:.0%} | {cert} |")
    lines += ["", f"Comparison top-{a['k']} changed on {s['compare_changed']:.0%} of queries (mean overlap "
              f"{s['compare_mean_overlap']:.0%}); LipSim's changed on {s['lipsim_changed']:.0%} (mean overlap "
              f"{s['lipsim_mean_overlap']:.0%}); LipSim's top-{a['k']} set certified at ε on {s['lipsim_certified']:.0%}; "
              f"certificate violations: {s['lipsim_violations']}. Machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-encoder", default="", help="LipSim spec of the demo index (default: the page's)")
    p.add_argument("--compare", default="", help="comparison encoder spec (default: the page's)")
    p.add_argument("--cache-dir", default="", help="cache directory (default: a temporary one)")
    p.add_argument("--queries", type=int, default=0, help="gallery photos queried (default 0: all)")
    p.add_argument("--eps", type=float, default=0.5, help="ℓ2 budget (the page's default 0.5)")
    p.add_argument("--steps", type=int, default=20, help="attack steps (the page's default 20)")
    p.add_argument("-k", type=int, default=5, help="results per encoder (the page's default 5)")
    p.add_argument("--quick", action="store_true", help="3 queries, 2 steps")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ui_contrast"),
                   help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    from ui.config import UIConfig

    cfg = UIConfig(compare=args.compare, demo_encoder=args.demo_encoder,
                   cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="robret-ui-contrast-"))
    report = run(cfg, 3 if args.quick else args.queries, args.eps, 2 if args.quick else args.steps, args.k)
    report["machine"] = f"{os.cpu_count()} CPUs, {platform.platform()}"
    report["quick"] = args.quick
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
