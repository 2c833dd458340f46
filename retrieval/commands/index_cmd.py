"""`robret index build|update|stats|verify|repair` and `robret query`."""
from __future__ import annotations

import json
import math
import os
import sys

from ._argtypes import nonnegative_float, positive_int


def register(sub) -> None:
    p = sub.add_parser("index", help="build and maintain an image index",
                       description="Index an image folder (FAISS on the unit sphere + a SQLAlchemy catalog), "
                       "keep it current, check it.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = isub.add_parser("build", help="index a folder or a list of files",
                        description="Embed every image under a folder, or every file of a list, into a new index "
                        "directory (an existing index of the same source and encoder is updated instead).")
    b.add_argument("folder", metavar="SOURCE",
                   help="image folder to index (recursively); @FILE: a list of files, one path per line (relative "
                   "paths are relative to FILE's directory); FILE.parquet: a table with a string column `path`; "
                   "file:// URIs are accepted for each. `update` reads the list again")
    b.add_argument("--root", default=None, metavar="DIR",
                   help="for a list: the indexed root; files outside it are refused (default: the deepest directory "
                   "holding every listed file)")
    b.add_argument("--index-dir", required=True, help="directory for the index and catalog")
    b.add_argument("--encoder", default=None,
                   help="encoder spec (default: lipsim:demo); see `robret encoder list`")
    b.add_argument("--db", default=None, metavar="URL",
                   help="SQLAlchemy URL of the catalog (default: $ROBRET_DB_URL if set, else a SQLite file "
                   "inside --index-dir). Never recorded with its password: give the password in "
                   "$ROBRET_DB_URL, or to PostgreSQL through PGPASSWORD or ~/.pgpass")
    b.add_argument("--index-type", default="auto", metavar="TYPE",
                   help="Flat, IVF<nlist>,Flat, HNSW<M> or auto (exact Flat below 1M vectors; default)")
    b.add_argument("--max-pixels", type=positive_int, default=None,
                   help="refuse images with more pixels (decompression bombs; default 64,000,000)")
    _common_run_args(b)
    b.set_defaults(func=_build)

    u = isub.add_parser("update", help="re-scan the indexed folder (or re-read its list of files)",
                        description="Embed new and changed files, reuse vectors of renamed ones, remove deleted "
                        "ones. Safe to re-run after a crash.")
    u.add_argument("index_dir", metavar="DIR")
    u.add_argument("--retry-failed", action="store_true", help="re-read files that failed before")
    _common_run_args(u)
    u.set_defaults(func=_update)

    r = isub.add_parser("repair", help="make catalog and index agree (rebuilding what is lost)",
                        description="Like update, but a missing, corrupt or altered index file is rebuilt "
                        "(re-embedding files) instead of refused.")
    r.add_argument("index_dir", metavar="DIR")
    _common_run_args(r)
    r.set_defaults(func=_repair)

    s = isub.add_parser("stats", help="counts, failures, encoder, index type")
    s.add_argument("index_dir", metavar="DIR")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--failed", type=int, default=10, metavar="N", help="list up to N failed files (default 10)")
    s.set_defaults(func=_stats)

    v = isub.add_parser("verify", help="prove catalog and index agree (exit 1 if not)",
                        description="Check the committed index file (exists, checksum), row counts, id sets, "
                        "vector norms and dimension against the catalog. Changes nothing.")
    v.add_argument("index_dir", metavar="DIR")
    v.add_argument("--files", action="store_true", help="also stat every indexed file (folder drift)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=_verify)

    q = sub.add_parser("query", help="search an index with an image (certified top-k)",
                       description="Print the top-k gallery images for a query image: rank, score, path and, "
                       "for a Lipschitz encoder, each result's certified radius and the top-k set's radius, "
                       "as ℓ2 norms over the query file's own samples (each scaled to [0,1] by its bit depth, in the "
                       "file's own channels: 1 for grayscale, 4 for RGBA or CMYK, …); files whose decoding is not "
                       "continuous in their samples (colour-key transparency, palettes) get no radius.")
    q.add_argument("image", help="query image file")
    q.add_argument("--index-dir", required=True)
    q.add_argument("-k", type=positive_int, default=10, help="results (default 10)")
    q.add_argument("--certify-eps", type=nonnegative_float, default=None, metavar="E",
                   help="also say whether the top-k set is certified against every ‖δ‖₂ ≤ E")
    q.add_argument("--candidates", type=positive_int, default=None, metavar="M",
                   help="list length used for the certificate (default max(2k, k+64))")
    q.add_argument("--no-certify", action="store_true", help="plain search, no certificate")
    q.add_argument("--cpu", action="store_true", help="keep FAISS on the CPU even if a GPU is visible")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_query)


def _common_run_args(p) -> None:
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call (default 32)")
    p.add_argument("--workers", type=positive_int, default=None, help="decode threads (default min(4, CPUs))")
    p.add_argument("--checkpoint-seconds", type=nonnegative_float, default=120.0,
                   help="write the index and commit the catalog at least this often (default 120)")
    p.add_argument("--cpu", action="store_true", help="keep FAISS and the encoder on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="decode and embed on a Ray cluster (pip install robret[ray]): ADDRESS of a running one "
                   "(e.g. auto, ray://head:10001); alone, RAY_ADDRESS or a new local cluster. Listing, hashing "
                   "and writing stay here")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="encoder actors on Ray (default: the cluster's GPUs, else its CPUs)")


def _options(args):
    from index import IngestOptions
    from index.decode import DecodeLimits

    opts = IngestOptions(batch_size=args.batch_size, checkpoint_seconds=args.checkpoint_seconds,
                         progress=not args.no_progress and not args.json and sys.stderr.isatty(),
                         use_gpu=not args.cpu, retry_failed=getattr(args, "retry_failed", False))
    if args.workers is not None:
        opts.workers = args.workers
    if getattr(args, "max_pixels", None) is not None:
        opts.limits = DecodeLimits(max_pixels=args.max_pixels)
    if args.ray_actors is not None and (args.ray is None or args.ray_actors < 1):
        raise ValueError("--ray-actors needs --ray and at least 1 actor")
    if args.ray is not None:
        from index.ray_embed import RayEmbedder, connect

        connect(None if args.ray == "local" else args.ray)
        opts.embed_files = RayEmbedder(actors=args.ray_actors, batch_size=opts.batch_size, use_gpu=opts.use_gpu)
    return opts


def _build(args) -> int:
    from index import FolderError, build_index
    from index.catalog import DB_URL_ENV

    from index.sources import resolve_source

    try:
        resolve_source(args.folder, args.root)  # a SOURCE that cannot be used is bad input (exit 2)
    except (FolderError, ValueError) as exc:
        print(f"robret index build: error: {exc}", file=sys.stderr)
        return 2
    report = build_index(args.folder, args.index_dir, args.encoder, db_url=args.db or os.environ.get(DB_URL_ENV),
                         index_type=args.index_type, options=_options(args), root=args.root)
    return _print_report(report, args.json)


def _update(args) -> int:
    from index import update_index

    return _print_report(update_index(args.index_dir, options=_options(args)), args.json)


def _repair(args) -> int:
    from index import repair_index, verify_index

    report = repair_index(args.index_dir, options=_options(args))
    code = _print_report(report, args.json)
    check = verify_index(args.index_dir)
    if not check.ok:
        print("repair did not make the index consistent:", *check.problems, sep="\n  ", file=sys.stderr)
        return 1
    return code


def _print_report(report, as_json: bool) -> int:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return 0
    print(f"{report.index_dir}: {report.total} images indexed ({report.index_type}, version {report.index_version}) "
          f"from {report.root}")
    print(f"  embedded     {report.embedded:>5}  ({report.indexed} new, {report.updated} changed)  "
          f"{report.images_per_second:.1f} images/s over {report.seconds:.1f} s")
    for label, n in (("renamed", report.renamed), ("reused", report.reused), ("unchanged", report.unchanged),
                     ("removed", report.removed), ("repaired", report.repaired),
                     ("failed", len(report.failed)), ("still failed", report.still_failed)):
        if n:
            print(f"  {label:<12} {n:>5}")
    if report.failed:
        kinds: dict[str, int] = {}
        for _, reason in report.failed:
            kind = reason.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        print("  failures by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
        for path, reason in report.failed[:20]:
            print(f"    {path}: {reason}")
        if len(report.failed) > 20:
            print(f"    … {len(report.failed) - 20} more (robret index stats DIR --failed N)")
    if report.unlisted:
        print(f"  unlisted     {len(report.unlisted):>5}  directories that could not be listed")
    for w in report.warnings[:10]:
        print(f"  warning: {w}")
    return 0


def _stats(args) -> int:
    from index import FAILED, index_stats
    from index.layout import IndexDir

    stats = index_stats(args.index_dir)
    layout = IndexDir(args.index_dir)
    catalog = layout.open_catalog()
    try:
        failed = [(r.path, r.reason) for r in catalog.find(FAILED, limit=args.failed)] if args.failed else []
    finally:
        catalog.close()
    if args.json:
        print(json.dumps({**stats, "failed_files": failed}, indent=2, default=str))
        return 0
    enc, idx, files = stats["encoder"], stats["index"], stats["files"]
    print(f"index      {stats['index_dir']}")
    print(f"folder     {stats['root']}")
    if stats["source"].get("list"):
        print(f"list       {stats['source']['list']} ({stats['source']['kind']}; read again at each update)")
    print(f"catalog    {stats['catalog']} (schema {stats['schema_version']})")
    print(f"encoder    {enc['spec']}  ({enc['name']}, dim {enc['dim']}, input {enc['input_size']} px, "
          f"L={enc['lipschitz']})")
    print(f"index      {idx['factory']} (requested {idx.get('requested')}), version {idx['version']}, "
          f"{idx['rows']} vectors, {idx['bytes'] / 2**20:.1f} MiB, params {idx.get('params') or {}}")
    print(f"files      {files['indexed']} indexed, {files['failed']} failed, {files['removed']} removed")
    unlisted = (stats.get("last_run") or {}).get("unlisted") or []
    if unlisted:
        print(f"unlisted   {len(unlisted)} director{'y' if len(unlisted) == 1 else 'ies'} could not be listed at the "
              f"last update (their files are kept as they were): {', '.join(unlisted[:10])}")
    if stats["failures"]:
        print("failures   " + ", ".join(f"{k} {n}" for k, n in stats["failures"].items()))
        for path, reason in failed:
            print(f"    {path}: {reason}")
    return 0


def _verify(args) -> int:
    from index import verify_index

    report = verify_index(args.index_dir, check_files=args.files)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        f = report.facts
        if report.ok:
            print(f"OK: version {f.get('version')}, {f.get('ntotal', 0)} vectors = {f.get('indexed_rows')} indexed "
                  f"rows, ids equal, norms 1, checksum matches")
        else:
            print("INCONSISTENT:" if report.repairable else "CANNOT VERIFY:", *report.problems, sep="\n  ")
            if report.repairable:
                print("run `robret index repair DIR` to fix it")
        for note in report.notes:
            print(f"note: {note}")
    return 0 if report.ok else 1


def _fmt(r) -> str:
    if r is None:
        return "-"
    return "inf" if math.isinf(r) else f"{r:.4g}"


def _query(args) -> int:
    from index import Gallery
    from retrieval.search import search_image

    if not os.path.exists(args.image):
        raise FileNotFoundError(f"query image {args.image!r} does not exist")
    with Gallery.open(args.index_dir, use_gpu=not args.cpu) as gallery:
        res = search_image(gallery, args.image, k=args.k, certify=not args.no_certify, eps=args.certify_eps,
                           candidates=args.candidates)
        if args.json:
            print(json.dumps({"query": os.path.abspath(args.image), "encoder": gallery.encoder_spec,
                              **res.to_dict()}, indent=2))
            return 0
        h, w = res.query_size or (0, 0)
        print(f"query {args.image} ({w}×{h} px)  encoder {gallery.encoder_spec}  "
              f"gallery {res.gallery_size} images ({gallery.store.factory})")
        certified = res.set_radius is not None
        at_eps = certified and res.eps is not None
        print(f"{'rank':>4}  {'score':>7}  " + (f"{'radius':>9}  " if certified else "")
              + (f"{'>eps':>4}  " if at_eps else "") + "path")
        for hit in res.hits:
            rad = f"{_fmt(hit.radius):>9}  " if certified else ""
            flag = f"{'yes' if hit.certified else 'no':>4}  " if at_eps else ""
            print(f"{hit.rank:>4}  {hit.score:7.4f}  {rad}{flag}{hit.path}")
        if certified:
            print(f"top-{res.k} set certified for ‖δ‖₂ < {_fmt(res.set_radius)} and its order for "
                  f"‖δ‖₂ < {_fmt(res.order_radius)}")
            if res.values:
                print(f"as an RMS change per sample: top-{res.k} set {_fmt(res.rms255(res.set_radius))}/255, "
                      f"order {_fmt(res.rms255(res.order_radius))}/255")
            print(f"radii: {res.radius_space} (L={res.lipschitz}, preprocessing norm {res.input_norm:.4g}, "
                  f"{'complete' if res.complete else f'{res.candidates} candidates'})")
            if res.eps is not None:
                verdict = "CERTIFIED" if res.eps_certified else "NOT certified"
                print(f"eps {res.eps:g}: top-{res.k} set {verdict}")
        for note in res.notes:
            print(f"note: {note}")
    return 0
