"""`robret attack IMAGE... --index-dir DIR`: perturb query images to change their top-k, and show what moved.

Untargeted (default): minimise the overlap with the clean top-k. Targeted (`--target FILE` or
`--target-rank N`): push one gallery item into the top-k, reporting its rank before and after.
`--attack autoattack`: robret's AutoAttack configuration (retrieval.attacks.AUTOATTACK_CONFIGURATION).
The perturbation is bounded in ℓ2 (or ℓ∞) over the query file's own [0, 1] samples — the image the
user gave, through the same map as `robret query`, so the certified radius printed next to it is the
one `robret query` states for that file. Large queries are attacked on a shrunk working copy for speed
(`--work-side`); the perturbation is carried back to the original, and every number is measured there.
Many queries (files, folders, @LIST) run in one process with the model and index loaded once.
The work is retrieval.attacks.attack_query; this module parses and prints. Exit status 1 if a query
could not be read or a certificate was violated (never expected), 2 for bad arguments.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from ._argtypes import check_linf_eps, nonnegative_int, pixel_eps, positive_int

DEFAULT_EPS = {"l2": 0.5, "linf": 8 / 255}
WORK_SIDE = 512


def register(sub) -> None:
    from retrieval.attack_info import AUTOATTACK_CONFIGURATION

    p = sub.add_parser("attack", help="attack queries' top-k (untargeted, targeted, AutoAttack)",
                       description="Perturb each query image within an ℓ2/ℓ∞ ball so that its top-k in an indexed "
                       "gallery changes; print the clean and adversarial top-k, the perturbation norms and, for "
                       "certified encoders, the radius within which no attack can succeed (ℓ2 over the file's "
                       "own [0,1] samples, as `robret query` states it, and as an RMS change per sample in 1/255). "
                       f"--attack autoattack runs {AUTOATTACK_CONFIGURATION}")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="query image files, folders (recursive) or @LIST (a file of paths, one per line, relative "
                   "to the list's folder)")
    p.add_argument("--index-dir", required=True, help="index directory (see `robret index build`)")
    p.add_argument("-k", type=positive_int, default=5, help="size of the top-k list (default 5)")
    p.add_argument("--attack", choices=("pgd", "autoattack"), default="pgd",
                   help="pgd (default: top-k PGD, untargeted or targeted) or autoattack (robret's configuration, "
                   "untargeted on the top-1; not RobustBench's standard evaluation)")
    p.add_argument("--norm", choices=("l2", "linf"), default="l2", help="threat model (default l2)")
    p.add_argument("--eps", type=pixel_eps, default=None, metavar="E",
                   help="budget in [0,1] sample units, a decimal or a fraction such as 8/255 (default 0.5 for l2, "
                   "8/255 for linf; an ℓ∞ budget above 1 is refused)")
    p.add_argument("--steps", type=positive_int, default=50, help="PGD steps / APGD iterations (default 50)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--target", help="targeted: an indexed file to push into the top-k")
    tgt.add_argument("--target-rank", type=positive_int, help="targeted: the item at this clean rank (1-based)")
    p.add_argument("--work-side", type=nonnegative_int, default=WORK_SIDE, metavar="N",
                   help=f"search for the perturbation on a copy shrunk to this longest side, for speed (default "
                   f"{WORK_SIDE}; 0: on the full image). The perturbation is carried back to the original inside "
                   "the same budget; norms, rankings and the certificate are always the original's")
    p.add_argument("--save", type=Path, help="write the adversarial image (PNG, 8 bits, the file's own mode; a CMYK "
                   "or YCbCr query is written as a TIFF of the same name); one query")
    p.add_argument("--save-dir", type=Path, help="write each adversarial image as DIR/<name>.adv.png "
                   "(<name>-2.adv.png, … when two queries share a name)")
    p.add_argument("--json", action="store_true", help="print one JSON document (schema in docs/json.md) instead of text")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="also write that JSON document to FILE")
    p.set_defaults(func=run, parser=p)


def _check(args) -> None:
    """Argument combinations argparse cannot express: a usage error (exit 2) with one line."""
    if args.eps is None:
        args.eps = DEFAULT_EPS[args.norm]
    try:
        if args.norm == "linf":
            check_linf_eps(args.eps)
    except ValueError as exc:
        args.parser.error(str(exc))
    if args.attack == "autoattack" and (args.target is not None or args.target_rank is not None):
        args.parser.error("--attack autoattack is untargeted: drop --target/--target-rank")
    if args.save is not None and args.save_dir is not None:
        args.parser.error("--save and --save-dir exclude each other")
    if args.save is not None and (args.save.suffix.lower() != ".png" or args.save.is_dir()):
        args.parser.error(f"--save writes a PNG file: give a file name ending in .png, not {str(args.save)!r}")


def run(args) -> int:
    _check(args)
    from retrieval.bulk import expand_sources

    missing = [item for item in args.images if not item.startswith("@") and not os.path.exists(item)]
    if missing:
        args.parser.error(f"query image {missing[0]!r} does not exist")
    try:  # files, folders and @LISTs as `robret query` reads them
        sources = expand_sources(args.images)
    except (ValueError, OSError) as exc:
        args.parser.error(str(exc))
    if not sources:
        args.parser.error(f"no image files in {' '.join(args.images)}")
    queries = [(Path(os.fsdecode(s.path)), s.problem) for s in sources]
    if args.save is not None and len(queries) > 1:
        args.parser.error(f"--save names one file but there are {len(queries)} queries: use --save-dir")
    dests = [args.save] if args.save is not None else (
        _adv_names(args.save_dir, [p for p, _ in queries]) if args.save_dir is not None else [None] * len(queries))

    from tqdm.auto import tqdm

    from encoder.image import DecodeError
    from index.gallery import Gallery
    from index.scan import shown_path
    from retrieval.attacks import PGDConfig, attack_query, query_image
    from retrieval.attack_info import AUTOATTACK_CONFIGURATION
    from retrieval.schema import SCHEMA_VERSION

    kind = "autoattack" if args.attack == "autoattack" else (
        "targeted" if args.target is not None or args.target_rank is not None else "untargeted")
    text = not args.json
    records, failed, violated = [], 0, False
    with Gallery.open(args.index_dir, use_gpu=False) as gallery:
        ids = gallery.ids()
        if len(ids) <= args.k:
            args.parser.error(f"the gallery has {len(ids)} items: -k must be smaller")
        paths = {int(i): shown_path(p) for i, p in zip(ids, gallery.paths(ids))}
        target = _resolve_target(args, paths)
        config = PGDConfig(norm=args.norm, eps=args.eps, steps=args.steps)
        if text and kind == "autoattack":
            print(AUTOATTACK_CONFIGURATION)
        for (path, problem), dest in zip(queries, dests):
            try:
                if problem is not None:  # found by the folder scan (a FIFO, a link out of the folder): never opened
                    raise problem
                query = query_image(gallery.decode(path).image)
            except (DecodeError, OSError) as exc:
                failed += 1
                error = ({"kind": exc.kind, "detail": exc.detail} if isinstance(exc, DecodeError)
                         else {"kind": "unreadable", "detail": str(exc)})
                records.append({"query": shown_path(path), "error": error})
                print(f"robret attack: {path}: {exc}", file=sys.stderr)
                continue
            with tqdm(total=args.steps, desc=f"attack {path.name}", unit="step", leave=False,
                      disable=not sys.stderr.isatty()) as bar:
                def progress(step, total, loss):
                    bar.update(1)

                out = attack_query(gallery, query.x, kind=kind, config=config, k=args.k, target=target,
                                   target_rank=args.target_rank, layout=query.layout, callback=progress,
                                   work_side=args.work_side or None, radius_space=query.space)
            record = {"query": shown_path(path), "radius_space": query.space, **out.to_dict(paths)}
            if query.uncertified:
                record["notes"] = [f"no certificate for the file's own samples: {query.uncertified}", *record["notes"]]
            saved = _save(args, dest, query, out, gallery)
            if saved is not None:
                record["saved"] = saved
            if out.certificate is not None and not out.certificate.ok:
                violated = True
            records.append(record)
            if text:
                _print_text(args, path, query, out, record, paths)
        document = {"schema": SCHEMA_VERSION, "command": "attack", "index_dir": str(args.index_dir),
                    "encoder": gallery.encoder_spec, "kind": kind,
                    "configuration": AUTOATTACK_CONFIGURATION if kind == "autoattack" else None,
                    "threat": {"norm": args.norm, "eps": args.eps, "steps": args.steps,
                               "units": "ε, ‖δ‖ and radii over each query file's own samples scaled to [0,1]"},
                    "work_side": args.work_side or None, "failed": failed, "results": records}
    if args.json:
        print(json.dumps(document, indent=2))
    if args.json_out is not None:
        from encoder.io import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(document, indent=2))
        if text:
            print(f"report written to {args.json_out}")
    return 1 if failed or violated else 0


def _resolve_target(args, paths: dict[int, str]) -> int | None:
    if args.target is None:
        return None
    want = Path(args.target).resolve()
    match = [i for i, p in paths.items() if p is not None and Path(p).resolve() == want]
    if not match:
        args.parser.error(f"--target {args.target} is not in the index")
    return match[0]


def _adv_names(folder: Path, paths: list[Path]) -> list[Path]:
    """DIR/<name>.adv.png for each query, in order; a name two queries share (a.jpg in two folders) gets -2, -3, …
    after the first, so that no adversarial image overwrites another."""
    out, taken = [], set()
    for path in paths:
        name, n = f"{path.stem}.adv.png", 1
        while name in taken:
            n += 1
            name = f"{path.stem}-{n}.adv.png"
        taken.add(name)
        out.append(folder / name)
    return out


def _save(args, dest: Path | None, query, out, gallery) -> dict | None:
    """Write the adversarial image to `dest` in the file's own mode (8 bits; PNG, or a TIFF beside `dest` for CMYK
    and YCbCr: `encoder.image.lossless_file`) and say how much of the adversarial top-k the rounding kept; None when
    nothing is to be saved."""
    if dest is None:
        return None
    import torch

    from encoder.image import lossless_file, pixels, to_pil
    from index.scan import shown_path
    from retrieval.attacks import ImageEmbedder, rank_query

    saved = to_pil(out.x_adv, query.layout)  # the file's own mode: ‖δ‖ was measured over its samples
    data, suffix, _ = lossless_file(saved)  # PNG, or TIFF for CMYK and YCbCr (which PNG cannot hold)
    dest = dest.with_suffix(suffix) if dest.suffix.lower() != suffix else dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    q8 = torch.from_numpy(pixels(saved).samples)[None]
    emb = ImageEmbedder(gallery.encoder, layout=query.layout)
    kept = rank_query(gallery, emb.embed(q8)[0].cpu().numpy(), args.k).top
    return {"path": shown_path(dest), "adversarial_topk_kept": len(set(kept) & set(out.after.top))}


def _r(x) -> str:
    return "inf" if x is None or math.isinf(x) else f"{x:.4g}"


def _print_text(args, path: Path, query, out, record: dict, paths: dict[int, str]) -> None:
    h, w = query.x.shape[-2:]
    rms_eps = args.eps / math.sqrt(query.x.numel()) * 255 if args.norm == "l2" else args.eps * 255
    print(f"\n{path}  ({w}×{h} px)  encoder {out.encoder}")
    print(f"threat {args.norm} ε = {args.eps:.6g} ({rms_eps:.3g}/255 {'RMS per sample' if args.norm == 'l2' else 'per sample'}); "
          f"ε, ‖δ‖ and radii over {query.space}")
    cert = out.certificate
    if cert is not None:
        r = cert.set_radius if args.norm == "l2" else cert.set_radius / math.sqrt(query.x.numel())
        verdict = "inside: the top-k cannot change" if args.eps < r else "outside: not guaranteed"
        print(f"certified top-{args.k} radius: ℓ2 {_r(cert.set_radius)} = {_r(out.rms255(cert.set_radius))}/255 RMS "
              f"per sample" + (f" (ℓ∞ {_r(r)})" if args.norm == "linf" else "") + f"  → ε is {verdict}")
    else:
        print("no Lipschitz bound: nothing is certified")

    def show(title, ranking):
        print(title)
        for rank, (i, s) in enumerate(zip(ranking.top, ranking.scores), 1):
            mark = "  * target" if i == out.target else ""
            print(f"  {rank:>2}. {s:.4f}  {paths.get(i)}{mark}")

    show(f"clean top-{args.k}:", out.before)
    show(f"adversarial top-{args.k}:", out.after)
    if out.target is not None:
        b, a = out.target_rank
        print(f"target {paths.get(out.target)}: rank {b or f'>{len(out.before.ids)}'} → "
              f"{a or f'>{len(out.after.ids)}'}")
    print(f"‖δ‖₂ = {out.delta_l2:.4f} ({_r(out.rms255(out.delta_l2))}/255 RMS)   ‖δ‖∞ = {out.delta_linf * 255:.2f}/255   "
          f"overlap with the clean top-{args.k}: {out.overlap * 100:.0f}%   {'success' if out.success else 'no success'}")
    if cert is not None:
        print(f"certificate {cert.verdict}")
    for note in record["notes"]:
        print(f"note: {note}")
    if "saved" in record:
        s = record["saved"]
        print(f"saved {s['path']} (8-bit rounding kept {s['adversarial_topk_kept']}/{args.k} of the adversarial top-{args.k})")
