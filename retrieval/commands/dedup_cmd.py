"""`robret dedup DIR`: groups of exact and near-duplicate images in an index, with certified verdicts.

The work is retrieval.dedup.find_duplicates; this module parses and prints (a table, `--json` or `--csv`).
"""
from __future__ import annotations

import json
import math

from ._argtypes import index_dir_args, index_dir_of, nonnegative_float, unit_interval


def register(sub) -> None:
    p = sub.add_parser("dedup", help="find exact and near-duplicate images in an index",
                       description="Group the indexed images whose stored vectors have cosine similarity ≥ T "
                       "(exact duplicates by content SHA-256 first; then an exact FAISS range search; groups are "
                       "connected components), like imagededup's find_duplicates. With a Lipschitz encoder each "
                       "pair gets a certified radius: its verdict (duplicate iff score ≥ T) holds for every "
                       "perturbation of both images, each of ℓ2 norm below it over the image's own [0,1] samples; "
                       "--certify-eps E says which verdicts hold at E and also lists the non-duplicate pairs "
                       "that are not certified at E (every other pair is).")
    index_dir_args(p)  # --index-dir DIR, or DIR
    p.add_argument("--threshold", type=unit_interval, default=0.9, metavar="T",
                   help="cosine similarity at or above which two images are duplicates (default 0.9)")
    p.add_argument("--certify-eps", type=nonnegative_float, default=None, metavar="E",
                   help="say, for each pair, whether its verdict is certified against ‖δ‖₂ ≤ E on either image")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON document")
    fmt.add_argument("--csv", action="store_true", help="print one CSV row per pair")
    p.set_defaults(func=run)


def _r(x) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.4g}")


def run(args) -> int:
    from index.gallery import Gallery
    from retrieval.dedup import find_duplicates
    from retrieval.schema import SCHEMA_VERSION

    index_dir = index_dir_of(args)
    with Gallery.open(index_dir, use_gpu=False) as gallery:
        report = find_duplicates(gallery, args.threshold, args.certify_eps)
        spec = gallery.encoder_spec
    if args.json:
        print(json.dumps({"schema": SCHEMA_VERSION, "command": "dedup", "index_dir": str(index_dir),
                          "encoder": spec, **report.to_dict()}, indent=2))
        return 0
    if args.csv:
        print(report.to_csv(), end="")
        return 0
    print(f"{report.gallery_size} images, encoder {spec}, threshold {report.threshold:g}: "
          f"{len(report.groups)} group(s), {len(report.pairs)} duplicate pair(s)")
    for n, group in enumerate(report.groups, 1):
        print(f"group {n} ({len(group)} images):")
        for i in group:
            print(f"  {report.paths.get(i)}")
    if report.pairs or report.near_misses:
        certified = report.lipschitz is not None
        print(f"\n{'score':>8}  {'kind':<9}" + (f"  {'radius':>8}" if certified else "")
              + (f"  {'cert':>4}" if report.certify_eps is not None and certified else "") + "  pair")
        for p in report.pairs + report.near_misses:
            kind = "exact" if p.exact else ("near" if p.duplicate else "not dup")
            line = f"{p.score:8.5f}  {kind:<9}" + (f"  {_r(p.radius):>8}" if certified else "")
            if report.certify_eps is not None and certified:
                line += f"  {'yes' if p.certified else 'no':>4}"
            print(f"{line}  {report.paths.get(p.a)}  ~  {report.paths.get(p.b)}")
    if report.lipschitz is None:
        print("no Lipschitz bound: no verdict is certified")
    else:
        print(f"\nradius: the verdict (duplicate iff score ≥ {report.threshold:g}) holds for every perturbation of both "
              f"images, each of ℓ2 norm < radius over its own samples in [0,1] (L={report.lipschitz:g}, "
              f"slack {report.slack:.3g})")
        if report.certify_eps is not None:
            held = sum(bool(p.certified) for p in report.pairs)
            print(f"at ε = {report.certify_eps:g}: {held}/{len(report.pairs)} duplicate verdicts certified; "
                  f"{len(report.near_misses)} non-duplicate pair(s) not certified (listed as 'not dup'); "
                  "every other pair is a certified non-duplicate")
    return 0
