"""`robret index build|update|stats|verify|repair|compact|export` and `robret query`.

Every subcommand takes the index directory as `--index-dir DIR`. `update`, `repair`, `stats`, `verify` and
`export` also accept it as their first positional argument, as they did before (a deprecated alias)."""
from __future__ import annotations

import json
import math
import os
import sys

from retrieval.schema import SCHEMA_VERSION

from ._argtypes import (INDEX_DIR_HELP, UsageError, index_dir_args, index_dir_of, nonnegative_float, nonnegative_int,
                        positive_int)



def register(sub) -> None:
    p = sub.add_parser("index", help="build and maintain an image index",
                       description="Index an image folder or an s3:// / gs:// prefix (FAISS on the unit sphere + a "
                       "SQLAlchemy catalog), "
                       "keep it current, check it.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    p.epilog = "Every ACTION takes the index directory as --index-dir DIR."

    b = isub.add_parser("build", help="index a folder, an s3:// or gs:// prefix, or a list of files",
                        description="Embed every image under a folder or an object-store prefix, or every file of a "
                        "list, into a new index directory (an existing index of the same source and encoder is "
                        "updated instead). Object stores are read through pyarrow: the S3 endpoint is "
                        "$ROBRET_S3_ENDPOINT (else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL), a GCS emulator "
                        "$STORAGE_EMULATOR_HOST, ROBRET_ANONYMOUS=1 reads public buckets; credentials come only from "
                        "the SDKs' usual chains (environment, credential files, instance identity) and are never "
                        "recorded.")
    b.add_argument("folder", metavar="SOURCE",
                   help="image folder to index (recursively); @FILE: a list of files, one path per line (relative "
                   "paths are relative to FILE's directory); FILE.parquet: a table with a string column `path`; "
                   "file:// URIs are accepted for each; s3://BUCKET/PREFIX or gs://BUCKET/PREFIX: every image "
                   "object under the prefix, and a list may name such URIs. `update` reads the list (or lists the "
                   "prefix) again")
    b.add_argument("--root", default=None, metavar="DIR",
                   help="for a list: the indexed root, a directory or an s3:// / gs:// prefix; entries outside it "
                   "are refused (default: the deepest directory or prefix holding every listed entry)")
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
    index_dir_args(u)
    u.add_argument("--retry-failed", action="store_true", help="re-read files that failed before")
    u.add_argument("--allow-empty", action="store_true", help=_ALLOW_EMPTY_HELP)
    _common_run_args(u)
    u.set_defaults(func=_update)

    r = isub.add_parser("repair", help="make catalog and index agree (rebuilding what is lost)",
                        description="Like update, but a missing, corrupt or altered index file is rebuilt "
                        "(re-embedding files) instead of refused.")
    index_dir_args(r)
    r.add_argument("--allow-empty", action="store_true", help=_ALLOW_EMPTY_HELP)
    _common_run_args(r)
    r.set_defaults(func=_repair)

    c = isub.add_parser("compact", help="merge the index's segments into one file",
                        description="Each checkpoint appends a segment (the vectors it added and the ids it removed); "
                        "compact writes the live vectors into one new index file, commits it in the catalog, then "
                        "deletes the files it replaces. No image is read or embedded. Writers also merge the newest "
                        "segments at their checkpoints (size-tiered) and write one file once an index holds 32 segments.")
    index_dir_args(c)
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_compact)

    s = isub.add_parser("stats", help="counts, failures, encoder, index type")
    index_dir_args(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--failed", type=int, default=10, metavar="N", help="list up to N failed files (default 10)")
    s.set_defaults(func=_stats)

    v = isub.add_parser("verify", help="prove catalog and index agree (exit 1 if not)",
                        description="Check the committed index files against the catalog: each exists, its SHA-256 "
                        "is the committed one, the rows marked indexed are the committed count and id set (by "
                        "their recorded digest). --deep also decodes the index file and checks its ids, vector "
                        "norms, dimension and type directly. Changes nothing.")
    index_dir_args(v)
    v.add_argument("--deep", action="store_true",
                   help="also decode the index file (FAISS) and check ids, norms, dimension and type directly")
    v.add_argument("--files", action="store_true", help="also stat every indexed file, or list the indexed bucket prefix (drift)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=_verify)

    e = isub.add_parser("export", help="write ids, paths, hashes, sizes and vectors to Parquet or .npy",
                        description="Export the indexed items: --parquet OUT writes one row per item (id, path "
                        "relative to the indexed folder, path_bytes (the same, its exact bytes), sha256, width, "
                        "height, vector as a fixed-size list of "
                        "float32; readable with pyarrow or pandas); --npy OUT writes the vectors (N, dim) float32 "
                        "to OUT and their ids (N,) int64 to OUT with .ids.npy in place of .npy.")
    index_dir_args(e)
    e.add_argument("--parquet", metavar="OUT", help="Parquet file to write")
    e.add_argument("--npy", metavar="OUT", help=".npy file for the vectors (ids beside it)")
    e.set_defaults(func=_export)

    q = sub.add_parser("query", help="search an index with images (certified top-k)",
                       description="Print the top-k gallery images for each query: rank, score, path and, for a "
                       "Lipschitz encoder, each result's certified radius and the top-k set's radius. A radius is "
                       "stated twice: as an ℓ2 norm over the query file's own samples (each scaled to [0,1] by its "
                       "bit depth, in the file's own C channels: 1 for grayscale, 3 for RGB, 4 for RGBA or CMYK, …), "
                       "and as the RMS change per sample it allows, in 1/255 units (ℓ2/√(C·H·W)·255), comparable "
                       "with one grey level whatever the image size. Files whose decoding is not continuous in their "
                       "samples (colour-key transparency, palettes) get no radius. The encoder and index load once "
                       "for all queries; a query that cannot be read is reported and the others go on (exit 1 if "
                       "any failed).",
                       epilog="JSON fields are documented in docs/json.md.")
    q.add_argument("images", nargs="*", metavar="IMAGE",
                   help="query image files, folders (every image inside, recursively) or @LIST files (one file, "
                   "folder or @LIST per line, relative to the list's folder; # starts a comment line)")
    q.add_argument("--id", type=nonnegative_int, action="append", default=[], metavar="N",
                   help="also query by an indexed item's stored vector (its file is not read; radii at the encoder "
                   "input); repeatable")
    q.add_argument("--index-dir", required=True, help=INDEX_DIR_HELP)
    q.add_argument("-k", type=positive_int, default=10, help="results per query (default 10)")
    q.add_argument("--certify-eps", type=nonnegative_float, default=None, metavar="E",
                   help="also say whether each top-k set is certified against every ‖δ‖₂ ≤ E")
    q.add_argument("--candidates", type=positive_int, default=None, metavar="M",
                   help="list length used for the certificate (default max(2k, k+64))")
    q.add_argument("--probe-budget", type=positive_int, default=None, metavar="LISTS",
                   help="IVF indexes: visit at most LISTS inverted lists for the certificate (sound, possibly "
                        "smaller than the exhaustive one; default: as many as the exhaustive certificate needs, "
                        "with at most 4096 items scored exactly). Not used by queries answered from int8 codes "
                        "(25 or more queries on 100,000+ vectors), whose scan bounds every item")
    q.add_argument("--no-certify", action="store_true", help="plain search, no certificate")
    q.add_argument("--exclude-self", action="store_true",
                   help="leave out hits whose content (SHA-256 of the file) equals the query's")
    q.add_argument("--relative", action="store_true", help="print result paths relative to the indexed folder")
    q.add_argument("--batch-size", type=positive_int, default=16, help="images per encoder call (default 16)")
    q.add_argument("--cpu", action="store_true", help="search on the CPU even if a GPU is visible")
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print JSON: one query's document, or {schema, summary, results: [...]} for several")
    fmt.add_argument("--jsonl", action="store_true", help="print one JSON document per query and line, as each is done")
    fmt.add_argument("--csv", action="store_true", help="print CSV: one row per result (a row with the error for a "
                     "failed query)")
    fmt.add_argument("--paths-only", action="store_true", help="print only the result paths, one per line, as the "
                     "file system holds them")
    # (no short -0: an option that looks like a number makes argparse read "-k -1" as two options)
    fmt.add_argument("--print0", action="store_true", help="like --paths-only, each path ended by a NUL byte "
                     "instead of a newline (for xargs -0): a name holding a newline stays one path")
    q.set_defaults(func=_query)


def _segments_limit(text: str) -> int | str:
    """`--compact-segments`: a count ≥ 0, or `never`."""
    return "never" if text == "never" else nonnegative_int(text)


def _common_run_args(p) -> None:
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call (default 32)")
    p.add_argument("--workers", type=positive_int, default=None, help="decode threads (default min(4, CPUs))")
    p.add_argument("--checkpoint-seconds", type=nonnegative_float, default=120.0,
                   help="write the index and commit the catalog at least this often (default 120)")
    p.add_argument("--compact-segments", type=_segments_limit, default=None, metavar="N|never",
                   help="checkpoints merge the newest segments size-tiered (each row rewritten O(log n) times) and "
                   "write the whole index as one file once N segments are live (default 32, "
                   "index.ingest.COMPACT_SEGMENTS); 0: at every checkpoint (no segments); never: no merging, only "
                   "`robret index compact` merges (checkpoints then stay proportional to new data)")
    p.add_argument("--cpu", action="store_true", help="keep FAISS and the encoder on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="decode and embed on a Ray cluster (pip install robret[ray]): ADDRESS of a running one "
                   "(e.g. auto, ray://head:10001); alone, RAY_ADDRESS or a new local cluster. Listing, hashing "
                   "and writing stay here")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="encoder actors on Ray (default: the cluster's GPUs, else its CPUs)")


_ALLOW_EMPTY_HELP = ("remove every item when the folder (or list) holds no file at all; without it such a run "
                     "changes nothing (an unmounted drive is not a deletion)")


def _options(args):
    from index import IngestOptions
    from index.decode import DecodeLimits

    opts = IngestOptions(batch_size=args.batch_size, checkpoint_seconds=args.checkpoint_seconds,
                         progress=not args.no_progress and not args.json and sys.stderr.isatty(),
                         use_gpu=not args.cpu, retry_failed=getattr(args, "retry_failed", False),
                         allow_empty=getattr(args, "allow_empty", False))
    if args.workers is not None:
        opts.workers = args.workers
    if args.compact_segments is not None:
        opts.compact_segments = None if args.compact_segments == "never" else args.compact_segments
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

    return _print_report(update_index(index_dir_of(args), options=_options(args)), args.json)


def _repair(args) -> int:
    from index import repair_index, verify_index

    index_dir = index_dir_of(args)
    report = repair_index(index_dir, options=_options(args))
    code = _print_report(report, args.json)
    check = verify_index(index_dir, deep=True)
    if not check.ok:
        print("repair did not make the index consistent:", *check.problems, sep="\n  ", file=sys.stderr)
        return 1
    return code


def _compact(args) -> int:
    from index.ingest import compact_index

    out = compact_index(index_dir_of(args))
    if args.json:
        print(json.dumps(out, indent=2))
    elif out["version"] == out["version_before"]:
        print(f"already one file: version {out['version']}, {out['rows']} vectors, {out['bytes'] / 2**20:.1f} MiB")
    else:
        print(f"compacted {out['files_before']} files ({out['bytes_before'] / 2**20:.1f} MiB) into one "
              f"({out['bytes'] / 2**20:.1f} MiB): version {out['version']}, {out['rows']} vectors, "
              f"{out['seconds']:.2f} s")
    return 0


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

    index_dir = index_dir_of(args)
    stats = index_stats(index_dir)
    layout = IndexDir(index_dir)
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
          f"{idx['rows']} vectors, {idx['bytes'] / 2**20:.1f} MiB in {idx.get('files', 0)} files, "
          f"params {idx.get('params') or {}}")
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

    report = verify_index(index_dir_of(args), check_files=args.files, deep=args.deep)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        f = report.facts
        if report.ok and f.get("checks") == "deep":
            print(f"OK: version {f.get('version')}, {f.get('ntotal', 0)} vectors = {f.get('indexed_rows')} indexed "
                  f"rows, ids equal, norms 1, checksums of {f.get('files')} files match")
        elif report.ok:
            print(f"OK: version {f.get('version')}, checksums of {f.get('files')} files match, {f.get('indexed_rows')} "
                  "indexed rows = the committed count and id set (--deep also decodes the index files)")
        else:
            print("INCONSISTENT:" if report.repairable else "CANNOT VERIFY:", *report.problems, sep="\n  ")
            if report.repairable:
                print("run `robret index repair --index-dir DIR` to fix it")
        for note in report.notes:
            print(f"note: {note}")
    return 0 if report.ok else 1


def _export(args) -> int:
    from index import Gallery
    from index.export import export_npy, export_parquet

    if not (args.parquet or args.npy):
        raise UsageError("say what to write: --parquet OUT and/or --npy OUT")
    for out in (args.parquet, args.npy):
        if out and os.path.isdir(out):
            raise UsageError(f"{out} is a folder: give a file name to write")
    if args.parquet and args.npy:
        from index.export import ids_path

        outputs = [os.path.abspath(p) for p in (args.parquet, args.npy, ids_path(args.npy))]
        if len(set(outputs)) < 3:
            raise UsageError(f"--parquet {args.parquet} would be overwritten by --npy {args.npy} or its ids file "
                             f"{ids_path(args.npy)}: give them different names")
    with Gallery.open(index_dir_of(args), use_gpu=False) as gallery:
        if args.parquet:
            rows = export_parquet(gallery, args.parquet)
            print(f"{args.parquet}: {rows} rows (id, path, path_bytes, sha256, width, height, "
                  f"vector[{gallery.dim}] float32)")
        if args.npy:
            vectors, ids = export_npy(gallery, args.npy)
            print(f"{vectors}: vectors ({len(gallery)}, {gallery.dim}) float32; {ids}: their ids")
    return 0


CSV_COLUMNS = ("query", "rank", "id", "score", "radius", "radius_rms255", "certified", "path", "error")


def _query(args) -> int:
    from retrieval.bulk import QueryReader, expand_sources, load_ahead, run_queries, summary

    if not args.images and not args.id:
        raise UsageError("give at least one query: an IMAGE, a folder, an @LIST file or --id N")
    try:
        sources = expand_sources(args.images, args.id)
    except ValueError as exc:  # an unreadable @LIST
        raise UsageError(str(exc)) from None
    if not sources:
        raise UsageError(f"no image files in {' '.join(args.images)}")
    # One FILE or one --id prints that query's document; folders, lists and several queries print a batch.
    single = len(args.images) + len(args.id) == 1 and not any(
        item.startswith("@") or os.path.isdir(item) for item in args.images)
    # The first batch is decoded and reduced before torch and FAISS load (retrieval/bulk.py: peak memory).
    reader = QueryReader.for_index(args.index_dir)
    ahead = load_ahead(reader, sources, args.batch_size)
    from index import Gallery

    with Gallery.open(args.index_dir, use_gpu=not args.cpu) as gallery:
        outcomes = run_queries(gallery, sources, args.k, certify=not args.no_certify, eps=args.certify_eps,
                               candidates=args.candidates, exclude_self=args.exclude_self, batch_size=args.batch_size,
                               probe_budget=args.probe_budget, reader=reader, loaded_ahead=ahead)
        done = []
        writer = None
        if args.csv:
            import csv

            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
        elif not (args.json or args.jsonl or args.paths_only or args.print0):
            print(f"encoder {gallery.encoder_spec}  gallery {len(gallery)} images ({gallery.store.factory}) "
                  f"in {gallery.root}")
        for outcome in outcomes:
            done.append(outcome)
            if not outcome.ok:
                print(f"robret: {outcome.source.label}: {outcome.error_kind}: {outcome.error}", file=sys.stderr)
            if args.jsonl:
                print(json.dumps(outcome.document(gallery, args.relative)), flush=True)
            elif writer is not None:
                _csv_rows(writer, outcome, gallery, args.relative)
                sys.stdout.flush()
            elif args.paths_only or args.print0:
                for hit in (outcome.result.hits if outcome.ok else []):
                    print(_path(hit.path, gallery, args.relative), end="\0" if args.print0 else "\n", flush=True)
            elif not args.json and outcome.ok:
                _print_result(outcome, gallery, args.relative)
        stats = summary(done)
        if args.json:
            docs = [o.document(gallery, args.relative) for o in done]
            doc = docs[0] if single else {"schema": SCHEMA_VERSION, "encoder": gallery.encoder_spec,
                                          "index_version": gallery.version, "summary": stats, "results": docs}
            print(json.dumps(doc, indent=2))
    if stats["failed"]:
        print(f"robret: {stats['failed']} of {stats['queries']} queries failed ("
              + ", ".join(f"{k} {n}" for k, n in stats["failures"].items()) + ")", file=sys.stderr)
        return 1
    return 0


def _path(path, gallery, relative: bool) -> str:
    from retrieval.bulk import relative_path

    return str(relative_path(path, gallery.root) if relative else path)


def _csv_rows(writer, outcome, gallery, relative: bool) -> None:
    label = outcome.source.label
    if not outcome.ok:
        writer.writerow([label, "", "", "", "", "", "", "", f"{outcome.error_kind}: {outcome.error}"])
        return
    res = outcome.result
    for hit in res.hits:
        writer.writerow([label, hit.rank, hit.id, f"{hit.score:.7g}", _num(hit.radius), _num(res.rms255(hit.radius)),
                         "" if hit.certified is None else str(hit.certified).lower(),
                         _path(hit.path, gallery, relative), ""])


def _num(r) -> str:
    return "" if r is None else ("inf" if math.isinf(r) else repr(float(r)))


def _fmt(r) -> str:
    if r is None:
        return "-"
    return "inf" if math.isinf(r) else f"{r:.4g}"


def _radius_words(res, r) -> str:
    """A radius as ℓ2 and as RMS per sample in 1/255 units; a zero radius is a tie, said in words."""
    if r is None:
        return "-"
    if r <= 0:
        return "0 (tie)"
    rms = res.rms255(r)
    return _fmt(r) + ("" if rms is None else f" = {_fmt(rms)}/255 RMS")


def _print_result(outcome, gallery, relative: bool) -> None:
    res = outcome.result
    h, w = res.query_size or (0, 0)
    print(f"\nquery {outcome.source.label} ({w}×{h} px)")
    certified = res.set_radius is not None
    at_eps = certified and res.eps is not None
    cells = [[str(hit.rank), f"{hit.score:.4f}"] + ([_fmt(hit.radius) if hit.radius else "0 (tie)",
                                                     _fmt(res.rms255(hit.radius))] if certified else [])
             + (["yes" if hit.certified else "no"] if at_eps else []) for hit in res.hits]
    head = ["rank", "score"] + (["radius ℓ2", "RMS/255"] if certified else []) + ([">eps"] if at_eps else [])
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    print("  ".join(f"{c:>{wd}}" for c, wd in zip(head, widths)) + "  path")
    for row, hit in zip(cells, res.hits):
        print("  ".join(f"{c:>{wd}}" for c, wd in zip(row, widths)) + "  " + _path(hit.path, gallery, relative))
    if certified:
        print(f"top-{res.k} set certified for ‖δ‖₂ < {_radius_words(res, res.set_radius)}; its order for "
              f"‖δ‖₂ < {_radius_words(res, res.order_radius)}")
        if res.values:
            print(f"RMS/255: the RMS change per sample a radius allows, ℓ2/√{res.values}·255 over the "
                  f"{res.values} samples (C·H·W) the radii are over: 1.0 = every sample moves one grey level")
        print(f"radii: {res.radius_space} (L={res.lipschitz}, preprocessing norm {res.input_norm:.4g}, "
              f"{'complete' if res.complete else f'{res.candidates} candidates'})")
        if res.method == "certified-ivf":
            print(f"certified IVF: {res.lists_visited} lists, {res.vectors_scanned} vectors scored; radii "
                  f"{'equal to' if res.exhaustive else 'at most'} the exhaustive certificate's"
                  f"{'; top-k exact (proved)' if res.exact_topk else ''}")
        if res.eps is not None:
            verdict = "CERTIFIED" if res.eps_certified else "NOT certified"
            print(f"eps {res.eps:g}: top-{res.k} set {verdict}")
        for sentence in res.ties():
            print(f"tie: {sentence}")
    for note in res.notes:
        print(f"note: {note}")
