"""Catalog commits as the gallery grows: what a checkpoint's `Catalog.commit_changes` costs at n rows.

A checkpoint inserts its batch's file rows in one transaction. The rows go to the end of the table (ids
ascend), but every index on a column with random values takes them at random places: with b new rows and
an index of P pages, a commit dirties about P·(1 − e^(−b/P)) pages, which grows with the gallery until
P ≫ b (then ≈ b pages, 4 KiB per row). `content_hash` (SHA-256 hex, 64 characters) is such a column.

One run commits the same batches into four SQLite catalogs side by side (the order rotates every batch,
the machine's noise falls on all alike):
- shipped:       `index.catalog.make_engine` as a writer uses it (WAL, synchronous=FULL, a
                 WRITER_CACHE_KIB page cache), schema 3: content_hash indexed by its first 16 characters;
- hex-index:     shipped with schema 2's index on all 64 characters of content_hash instead;
- sqlite-cache:  shipped with SQLite's default page cache (`PRAGMA cache_size=-2000`, 2 MiB);
- no-hash-index: shipped, without an index on content_hash (what an index costs; robret needs one
                 for `Gallery.ids_with_content`, so this is a measurement, not an option).
With `--postgres`, a fifth catalog beside them: the shipped schema on a throwaway PostgreSQL server
(benchmarks/_postgres.py: Debian's server on a Unix socket, fsync on as a user's server runs it).
Rows look like a real gallery's (nested relative paths, SHA-256 hex, sizes, times); the table gives the
mean commit time over each tenth of the batches.

    python -m benchmarks.catalog_commit                           # 40 batches of 16,000 rows (640k)
    python -m benchmarks.catalog_commit --batches 63 --batch 16000  # ~1M rows
    python -m benchmarks.catalog_commit --quick                   # 6 batches of 300 rows (seconds)
    python -m benchmarks.catalog_commit --postgres                # and a PostgreSQL catalog beside them
Writes benchmarks/results/catalog_commit.json, .md and .png (commit time against rows; --out PREFIX).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._output import line_plot, write_report

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("shipped", "hex-index", "sqlite-cache", "no-hash-index")


def _catalog(path: Path, variant: str, postgres=None):
    from sqlalchemy import event

    from index.catalog import HEX_CONTENT_INDEX, Catalog, content_index, make_engine, metadata

    if variant == "postgres":
        from benchmarks._postgres import PASSWORD
        url = postgres.url(postgres.create_database(), PASSWORD)
    else:
        url = f"sqlite:///{path}"
    engine = make_engine(url)
    if variant == "sqlite-cache":
        @event.listens_for(engine, "connect")
        def _default_cache(dbapi_conn, _record):  # noqa: ANN001 (runs after make_engine's pragmas)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA cache_size=-2000")
            cur.close()
    metadata.create_all(engine)
    if variant in ("hex-index", "no-hash-index"):
        with engine.begin() as c:
            c.exec_driver_sql(f"DROP INDEX {content_index.name}")
            if variant == "hex-index":
                c.exec_driver_sql(f"CREATE INDEX {HEX_CONTENT_INDEX} ON robret_files (content_hash)")
    return Catalog(url, engine=engine)


def _rows(start: int, count: int) -> list[dict]:
    from index.catalog import INDEXED, utcnow

    now = utcnow()
    rows = []
    for i in range(start, start + count):
        path = f"photos/{i % 997:03d}/{i // 997 % 61:02d}/IMG_{i:08d}.jpg"
        rows.append({"id": i, "path_key": path.encode(), "path": path, "size": 200_000 + i % 9973,
                     "content_hash": hashlib.sha256(i.to_bytes(8, "little")).hexdigest(),
                     "mtime_ns": 1_700_000_000_000_000_000 + i, "width": 640, "height": 480, "status": INDEXED,
                     "reason": None, "notes": None, "encoder": "lipsim:demo", "embedded_at": now,
                     "created_at": now, "updated_at": now})
    return rows


def tenth_means(seconds: list[float]) -> list[float]:
    """Mean of each consecutive tenth of `seconds` (⌈n/10⌉ values per tenth; the last may be shorter)."""
    step = max(1, -(-len(seconds) // 10))
    return [sum(seconds[i:i + step]) / len(seconds[i:i + step]) for i in range(0, len(seconds), step)]


def run(batches: int, batch: int, work: Path, postgres=None) -> dict:
    """Commit the same batches to every variant's catalog, rotating their order; `postgres`: a running
    server (benchmarks._postgres.PostgresServer) for a fourth catalog."""
    variants = VARIANTS + (("postgres",) if postgres is not None else ())
    catalogs = {v: _catalog(work / f"{v}.db", v, postgres) for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    sizes: dict[str, int] = {}
    try:
        for b in range(batches):
            rows = _rows(b * batch, batch)
            for v in variants[b % len(variants):] + variants[:b % len(variants)]:
                t = time.perf_counter()
                catalogs[v].commit_changes(rows, [], {"benchmark_batch": b})
                seconds[v].append(time.perf_counter() - t)
        counts = {v: catalogs[v].counts() for v in variants}
        with catalogs["shipped"].engine.connect() as c:
            cache = c.exec_driver_sql("PRAGMA cache_size").scalar()
        if postgres is not None:
            with catalogs["postgres"].engine.connect() as c:
                sizes["postgres"] = int(c.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())
    finally:
        for cat in catalogs.values():
            cat.close()
    sizes.update({v: sum(p.stat().st_size for p in work.glob(f"{v}.db*")) for v in VARIANTS})
    return {"variants": list(variants), "batches": batches, "batch": batch, "rows": batches * batch,
            "shipped_cache_size": cache,
            "seconds": seconds, "tenths": {v: tenth_means(s) for v, s in seconds.items()},
            "total_seconds": {v: sum(s) for v, s in seconds.items()}, "counts": counts, "bytes_on_disk": sizes,
            "machine": f"{os.cpu_count()} CPUs, {platform.platform()}"}


def table(report: dict) -> str:
    step = max(1, -(-report["batches"] // 10))
    variants = report.get("variants", VARIANTS)
    lines = [f"| rows after the commit ({report['batch']:,} per commit) | " + " | ".join(variants) + " |",
             "|---" * (len(variants) + 1) + "|"]
    for i, _ in enumerate(report["tenths"]["shipped"]):
        last = min(report["batches"], (i + 1) * step) * report["batch"]
        first = (i * step + 1) * report["batch"]
        cells = [f"{report['tenths'][v][i] * 1e3:.1f} ms" for v in variants]
        lines.append(f"| {first:,} – {last:,} | " + " | ".join(cells) + " |")
    lines.append("| **all commits** | " + " | ".join(f"**{report['total_seconds'][v]:.2f} s**" for v in variants)
                 + " |")
    total = report["total_seconds"]
    ratios = "; ".join(f"total {v} / shipped = {total[v] / total['shipped']:.2f}×" for v in variants if v != "shipped")
    return ("\n".join(lines) + f"\n\nMean commit time per tenth of the batches. Shipped page cache: "
            f"`PRAGMA cache_size` = {report['shipped_cache_size']}; {ratios}. "
            f"Machine: {report['machine']}.\n")


def plot(report: dict, path: Path) -> None:
    """Each commit's milliseconds against the rows in the catalog after it, one line per variant."""
    rows = [(b + 1) * report["batch"] for b in range(report["batches"])]
    variants = report.get("variants", VARIANTS)
    line_plot(path, {v: (rows, [s * 1e3 for s in report["seconds"][v]]) for v in variants},
              "rows in the catalog after the commit", "commit time (ms)",
              f"Catalog commits of {report['batch']:,} rows as the gallery grows "
              f"({'SQLite and PostgreSQL' if 'postgres' in variants else 'SQLite'})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="6 batches of 300 rows")
    p.add_argument("--batches", type=int, default=None, help="commits per catalog (default 40)")
    p.add_argument("--batch", type=int, default=None, help="rows per commit (default 16000)")
    p.add_argument("--postgres", action="store_true",
                   help="also a PostgreSQL catalog, on a throwaway server this run starts (fsync on)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "catalog_commit"),
                   help="output prefix: PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    batches = args.batches or (6 if args.quick else 40)
    batch = args.batch or (300 if args.quick else 16000)
    if batches < 1 or batch < 1:
        p.error("--batches and --batch must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="robret-catalog-commit-"))
    try:
        with contextlib.ExitStack() as stack:
            server = None
            if args.postgres:
                from benchmarks._postgres import Unavailable, throwaway_postgres
                try:
                    server = stack.enter_context(throwaway_postgres(fsync=True))
                except Unavailable as exc:
                    p.error(f"--postgres: {exc}")
            report = run(batches, batch, work, server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["quick"] = args.quick
    return write_report(args.out, report, table(report), plot)


if __name__ == "__main__":
    main()
