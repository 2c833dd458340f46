"""Latency of the page's two actions, measured through the page's own engine (ui/engine.py):

    search: embed + search + certify the working query, both encoders (what the page does per query)
    attack: one attack of each kind at the page's defaults, both encoders, with before/after searches

    python -m benchmarks.ui_latency [--demo-encoder SPEC] [--compare SPEC] [--cache-dir DIR] [--steps N]

Defaults are the page's: the demo index of the sample photos, lipsim:demo (or lipsim:cpu-small with
random weights when no demo model is bundled), DreamSim or standard:demo. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-encoder", default="", help="LipSim spec of the demo index (default: the page's)")
    p.add_argument("--compare", default="", help="comparison encoder spec (default: the page's)")
    p.add_argument("--index-dir", default="", help="an existing LipSim index instead of the demo index")
    p.add_argument("--cache-dir", default="", help="cache directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=20, help="attack steps (the page's default: 20)")
    p.add_argument("--queries", type=int, default=10, help="gallery queries timed for search")
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from ui.config import UIConfig
    from ui.engine import AttackSpec, Engine
    from ui.query import query_pixels

    torch.set_num_threads(2)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="robret-ui-bench-")
    cfg = UIConfig(index_dir=args.index_dir, compare=args.compare, demo_encoder=args.demo_encoder, cache_dir=cache)
    t0 = time.perf_counter()
    engine = Engine(cfg)
    load = time.perf_counter() - t0
    print(f"gallery: {len(engine.gallery)} images ({engine.index_dir})")
    print(f"encoders: {engine.lipsim.label} (L = {engine.lipsim.encoder.lipschitz}) vs {engine.compare.label}")
    for note in engine.notes:
        print(f"note: {note}")
    print(f"engine load (indexes built or reused, encoders loaded): {load:.1f} s\n")

    items = engine.gallery[: args.queries]
    queries = [query_pixels(engine.image(g.id)) for g in items]
    engine.search(queries[0].x, args.k, layout=queries[0].layout)  # warm-up
    times = []
    for q in queries:
        t = time.perf_counter()
        engine.search(q.x, args.k, layout=q.layout)
        times.append(time.perf_counter() - t)
    x, hw, layout = queries[0].x, queries[0].original_hw, queries[0].layout
    print(f"| action (k = {args.k}, query {items[0].name} {hw[1]}×{hw[0]} px) | wall time |")
    print("| --- | --- |")
    print(f"| search, both encoders (median of {len(times)} gallery queries) | {statistics.median(times) * 1000:.0f} ms |")
    target = engine.search(x, args.k, layout=layout)["lipsim"].ids[-1]
    for spec in (AttackSpec("untargeted", "l2", 0.5, args.steps, args.k),
                 AttackSpec("targeted", "l2", 0.5, args.steps, args.k, target_id=int(target)),
                 AttackSpec("autoattack", "l2", 0.5, args.steps, args.k),
                 AttackSpec("untargeted", "linf", 8 / 255, args.steps, args.k)):
        t = time.perf_counter()
        res = engine.attack(x, spec, layout=layout)
        total = time.perf_counter() - t
        per = ", ".join(f"{r.label} {r.seconds:.2f} s (overlap@{args.k} {r.overlap:.0%})" for r in res.values())
        eps = f"{spec.eps:.2f}" if spec.norm == "l2" else f"{spec.eps * 255:.0f}/255"
        print(f"| attack {spec.kind}, {spec.norm} ε = {eps}, {spec.steps} steps: {per} | {total:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
