"""The catalog (SQLAlchemy 2.x): one row per image file, plus the facts the index depends on.

Tables:
    robret_files   one row per file ever seen under the root: stable 64-bit id (= the FAISS id),
                   relative path, content hash, size, mtime, displayed width/height, status
                   (indexed / failed / removed), failure reason, notes, encoder, timestamps.
    robret_meta    key → JSON: schema_version, owner (the id of the one index directory using this
                   catalog) and index_dir, root, encoder identity, index {version, rows, segments
                   (the live files: name, kind, sha256, rows, removed), sha256 and file (the base's),
                   ids_sha256, factory, requested, params, dim}, created_at, last_run.

The catalog owns the truth; the index files are derived from it. A row is `indexed` exactly when its
id is in the index the committed live set yields (index/layout.py) — ingest commits row changes and
the new live set in one transaction, after its new file is durably on disk (see ingest.py).
SQLite files run in WAL mode with synchronous=FULL. Any SQLAlchemy URL works; `path_key` is a
binary column (raw file-name bytes, so non-UTF-8 names round-trip), which SQLite and PostgreSQL
index directly. `content_hash` is indexed by its first CONTENT_PREFIX hex characters only
(`ix_robret_files_content_prefix`, schema 3): a third of the pages of an index on all 64, which a
checkpoint's commit dirties at random places (docs/benchmarks.md, "Catalog commits as the gallery grows").
A writer opening an older catalog of its own migrates it in one transaction (`Catalog.migrate`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
from typing import Any, Iterable

from sqlalchemy import (BigInteger, Column, DateTime, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        bindparam, create_engine, event, func, inspect, insert, literal_column, select, text,
                        update)
from sqlalchemy.engine import URL, Connection, Engine, Row, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex

from .errors import CatalogError, EncoderMismatchError, SchemaVersionError

__all__ = ["SCHEMA_VERSION", "CONTENT_PREFIX", "INDEXED", "FAILED", "REMOVED", "DB_URL_ENV", "metadata", "meta_table",
           "files_table", "FileRecord", "record_dict", "ids_digest", "Catalog", "connect_url", "recorded_url",
           "safe_url", "utcnow"]

log = logging.getLogger(__name__)

# 3: content_hash indexed by a prefix (CONTENT_PREFIX); 2: the index is a live set of files (index.segments);
# 1 had one index file
SCHEMA_VERSION = 3
CONTENT_PREFIX = 16  # hex characters of content_hash its index holds (64 bits; a match is then checked in full)
DB_URL_ENV = "ROBRET_DB_URL"  # a catalog URL, possibly with its password, read from the environment only
INDEXED, FAILED, REMOVED = "indexed", "failed", "removed"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# SQLAlchemy Core tables (no ORM: the catalog is read and written as rows, and `robret index stats` /
# `verify` start faster without the ORM's import). Existing catalogs created by the earlier ORM
# declarations have exactly these tables, columns, constraints and index names.
metadata = MetaData()

meta_table = Table(
    "robret_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),  # JSON
)

files_table = Table(
    "robret_files", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),  # the FAISS id
    Column("path_key", LargeBinary, unique=True, nullable=False),  # relative path, raw bytes
    Column("path", Text, nullable=False),  # relative path for display (undecodable bytes as \xNN)
    Column("content_hash", String(64)),  # SHA-256 hex (indexed by its prefix: content_prefix below)
    Column("size", BigInteger),  # bytes
    Column("mtime_ns", BigInteger),
    Column("width", Integer),  # displayed size (after EXIF orientation)
    Column("height", Integer),
    Column("status", String(16), index=True, nullable=False),  # indexed | failed | removed
    Column("reason", Text),  # why it failed ("kind: detail")
    Column("notes", Text),  # conversions applied ("; "-separated)
    Column("encoder", String(200)),  # encoder name that embedded it
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("embedded_at", DateTime(timezone=True)),
)


def content_prefix(column):
    """substr(column, 1, CONTENT_PREFIX), with literal bounds: a query must spell the indexed expression
    exactly for SQLite and PostgreSQL to use the index."""
    return func.substr(column, literal_column("1"), literal_column(str(CONTENT_PREFIX)))


content_index = Index("ix_robret_files_content_prefix", content_prefix(files_table.c.content_hash))
HEX_CONTENT_INDEX = "ix_robret_files_content_hash"  # schema ≤ 2: the index on all 64 hex characters


def with_content(content_hash: str, prefix: bool = True):
    """SELECT id, content_hash of the indexed rows whose hash starts as `content_hash` does (the index's
    prefix); the caller keeps those equal in full. Only the prefix is in SQL: with the full equality beside
    it, SQLite's planner substitutes it into the expression and no longer uses the index. prefix=False: the
    full equality, which schema 2's index serves (a reader of a catalog no writer has migrated yet)."""
    t = files_table.c
    where = (content_prefix(t.content_hash) == content_hash[:CONTENT_PREFIX] if prefix
             else t.content_hash == content_hash)
    return select(t.id, t.content_hash).where(where, t.status == INDEXED)


def _content_indexes(c: Connection) -> None:
    """Schema 3's index on content_hash (its prefix) in place of schema 2's (in full), in c's transaction."""
    c.execute(CreateIndex(content_index, if_not_exists=True))  # (SQLAlchemy's inspector skips expression indexes)
    c.execute(text(f"DROP INDEX IF EXISTS {HEX_CONTENT_INDEX}"))

# One image file under the root (a tombstone once it disappears): a row of robret_files, whose
# attributes are the column names (rec.path, rec.content_hash, …).
FileRecord = Row


def record_dict(rec: Row) -> dict:
    """A file row as a dict of its columns, without the raw `path_key` bytes (for JSON)."""
    return {k: v for k, v in rec._mapping.items() if k != "path_key"}


# Metadata keys every catalog has (and the fields each holds), checked at open.
REQUIRED_META = {"root": (), "encoder": ("spec", "name", "dim"),
                 "index": ("version", "rows", "dim", "factory", "sha256")}

# Columns ingest reads to plan an update, and writes back (with updated_at) for changed rows.
PLAN_COLUMNS = ("id", "path_key", "path", "content_hash", "size", "mtime_ns", "width", "height", "status",
                "reason", "notes", "encoder", "embedded_at")


WRITER_CACHE_KIB = 64 * 1024  # SQLite page cache of a writer connection (KiB; readers keep the default)


def make_engine(url: str, read_only: bool = False) -> Engine:
    """An engine for `url`. Writers put SQLite in WAL mode (persistent in the file); readers
    (`read_only`) never write a pragma, and on read-only media open the file read-only (see
    `_read_only_sqlite_url`), so a shared gallery on a read-only drive can be queried."""
    if read_only:
        url = _read_only_sqlite_url(url)
    try:
        engine = create_engine(url, future=True)
    except ImportError as exc:  # the dialect's driver module is not installed
        if make_url(url).get_backend_name() == "postgresql":
            hint = "PostgreSQL catalogs need psycopg 3: pip install 'robret[postgres]'"
        else:
            hint = f"install the Python driver module {exc.name!r} for it"
        raise CatalogError(f"no database driver for the catalog URL {safe_url(url)}: {hint}") from None
    except SQLAlchemyError as exc:  # unparsable URL, unknown dialect or driver name
        raise CatalogError(f"unusable catalog URL {safe_url(url)}: {str(exc).splitlines()[0]} (expected a "
                           "SQLAlchemy URL such as sqlite:///PATH or postgresql://USER@HOST/DB)") from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            if not read_only:
                cur.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed index version survives power loss too (old index files are
                # deleted right after the commit, so the commit must be durable first).
                cur.execute("PRAGMA synchronous=FULL")
                # A writer's commit inserts a batch's rows into the content_hash index at random
                # places; SQLite's default 2 MiB page cache re-reads most of that index at every
                # checkpoint once a gallery has ~100k rows (docs/benchmarks.md, "Catalog commits").
                cur.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            cur.close()
    return engine


def recorded_url(url: str) -> str:
    """`url` as robret records it (robret-index.json): without its password, which is never written
    to disk nor printed. `connect_url` finds it again at connection time."""
    try:
        parsed = make_url(url)
    except Exception:  # unparsable: make_engine refuses it before anything is recorded
        return url
    if parsed.password is None:
        return url
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database,
                      parsed.query)
    return bare.render_as_string(hide_password=False)


def connect_url(recorded: str) -> str:
    """The URL to connect to a recorded (password-less) catalog URL with: $ROBRET_DB_URL when it names
    the same database (it may carry the password), else the recorded URL itself — PostgreSQL's
    driver (libpq) then takes the password from PGPASSWORD or ~/.pgpass."""
    env = os.environ.get(DB_URL_ENV)
    if env and recorded_url(env) == recorded_url(recorded):
        return env
    return recorded


def _read_only_sqlite_url(url: str) -> str:
    """`url` unchanged, except a SQLite file that this process cannot write (read-only media or
    permissions): then opened with mode=ro, and immutable=1 when no write-ahead log exists (WAL
    readers otherwise need to create the -shm file beside it, which read-only media forbid; without
    a -wal file the main file holds every committed transaction)."""
    from urllib.parse import quote

    try:
        parsed = make_url(url)
    except Exception:  # an unparsable URL: create_engine reports it
        return url
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return url
    if os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK):
        return url
    query = {"mode": "ro", "uri": "true"}
    if not os.path.exists(path + "-wal"):
        query["immutable"] = "1"
    return parsed.set(database=f"file:{quote(os.path.abspath(path))}", query=query).render_as_string(
        hide_password=False)


class Catalog:
    """A catalog at a SQLAlchemy URL. `create` makes a new one; `open` checks schema and tables."""

    def __init__(self, url: str, engine: Engine | None = None, read_only: bool = False):
        self.url = url
        self.engine = engine or make_engine(url, read_only=read_only)
        self.schema_version = SCHEMA_VERSION  # as read by `open` (`ids_with_content` queries by it)

    # Opening --------------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, meta: dict[str, Any]) -> "Catalog":
        """Create the tables and write `meta` (plus schema_version and created_at)."""
        cat = cls(url)
        try:
            metadata.create_all(cat.engine)
        except SQLAlchemyError as exc:
            raise CatalogError(f"cannot create the catalog at {safe_url(url)}: {exc}") from None
        if cat.meta():
            raise CatalogError(f"a catalog already exists at {safe_url(url)}")
        with cat.engine.begin() as c:
            cat.set_meta({"schema_version": SCHEMA_VERSION, "created_at": utcnow().isoformat(), **meta}, c)
            _content_indexes(c)  # (create_all adds none to tables an older robret's interrupted creation left)
        cat.schema_version = SCHEMA_VERSION
        return cat

    @classmethod
    def open(cls, url: str, read_only: bool = False) -> "Catalog":
        """An existing catalog. `read_only`: this process only reads (queries, verify, stats)."""
        cat = cls(url, read_only=read_only)
        try:
            try:
                tables = set(inspect(cat.engine).get_table_names())
            except SQLAlchemyError as exc:
                raise CatalogError(f"cannot open the catalog at {safe_url(url)}: {exc}") from None
            if not {"robret_meta", "robret_files"} <= tables:
                raise CatalogError(f"no robret catalog at {safe_url(url)}")
            cat.schema_version = cat.check_schema()
            cat.check_meta()
        except BaseException:
            cat.close()
            raise
        return cat

    def close(self) -> None:
        self.engine.dispose()

    def check_schema(self) -> int:
        version = self.meta().get("schema_version")
        if not isinstance(version, int):
            raise CatalogError("the catalog has no schema version")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the catalog has schema version {version}, newer than this robret's {SCHEMA_VERSION}: "
                "upgrade robret to open it")
        return version

    def migrate(self) -> int:
        """Bring a catalog of an older schema to SCHEMA_VERSION, in one transaction (a crash or a failure leaves
        it as it was): schema ≤ 2 → 3 indexes content_hash by its prefix instead of in full. Writers call it
        once the catalog is known to be theirs (`IndexDir.open_catalog`); readers of an older catalog read it
        as it is (`ids_with_content` queries by its version). The version the catalog had is returned."""
        version = self.check_schema()
        if version < 3:
            try:
                with self.engine.begin() as c:
                    # The version's UPDATE first: Python's sqlite3 opens a transaction before DML only, so DDL
                    # run first would commit on its own, and a later failure would leave it half-migrated.
                    self.set_meta({"schema_version": SCHEMA_VERSION}, c)
                    _content_indexes(c)
            except SQLAlchemyError as exc:
                raise CatalogError(f"cannot migrate the catalog at {safe_url(self.url)} from schema {version} to "
                                   f"{SCHEMA_VERSION} (its user must be allowed to create and drop indexes): "
                                   f"{str(exc).splitlines()[0]}") from None
            log.info("catalog %s: schema %d → %d (content hashes indexed by prefix)", safe_url(self.url), version,
                     SCHEMA_VERSION)
        self.schema_version = SCHEMA_VERSION
        return version

    def check_meta(self) -> dict[str, Any]:
        """The metadata, if it has every key readers and writers rely on (CatalogError naming the
        missing ones otherwise: such a catalog was not written by robret, or was altered)."""
        meta = self.meta()
        missing = [key for key in REQUIRED_META if key not in meta]
        for key, fields in REQUIRED_META.items():
            if key in meta:
                value = meta[key]
                missing += [f"{key}.{f}" for f in fields if not isinstance(value, dict) or f not in value]
        if missing:
            raise CatalogError(f"the catalog's metadata lacks {', '.join(map(repr, missing))}: it was not "
                               "written by this robret or was altered; build a new index directory")
        return meta

    # Metadata -------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        with self.engine.connect() as c:
            return {key: json.loads(value) for key, value in c.execute(select(meta_table.c.key, meta_table.c.value))}

    def set_meta(self, values: dict[str, Any], connection: Connection | None = None) -> None:
        """Write `values` (key → JSON-able), replacing existing keys; in `connection`'s transaction when
        given, else in a transaction of its own."""
        def write(c: Connection) -> None:
            for key, value in values.items():
                text = json.dumps(value, sort_keys=True)
                if c.execute(update(meta_table).where(meta_table.c.key == key).values(value=text)).rowcount == 0:
                    c.execute(insert(meta_table).values(key=key, value=text))

        if connection is not None:
            write(connection)
            return
        with self.engine.begin() as c:
            write(c)

    def check_encoder(self, identity: dict) -> None:
        """Refuse an encoder other than the one recorded (name, dimension and weights fingerprint)."""
        recorded = self.meta().get("encoder")
        if recorded is None:
            raise CatalogError("the catalog records no encoder")
        check_same_encoder(recorded, identity)

    # Rows -----------------------------------------------------------------------------------
    def plan_rows(self) -> list[dict]:
        """Every row's planning columns (see PLAN_COLUMNS), as dicts."""
        cols = [files_table.c[name] for name in PLAN_COLUMNS]
        with self.engine.connect() as c:
            return [dict(zip(PLAN_COLUMNS, r)) for r in c.execute(select(*cols))]

    def max_id(self) -> int:
        with self.engine.connect() as c:
            return int(c.scalar(select(func.max(files_table.c.id))) or 0)

    def counts(self) -> dict[str, int]:
        t = files_table.c
        with self.engine.connect() as c:
            rows = c.execute(select(t.status, func.count()).group_by(t.status))
            out = {INDEXED: 0, FAILED: 0, REMOVED: 0}
            out.update({status: int(n) for status, n in rows})
            return out

    def indexed_id_list(self) -> list[int]:
        """The indexed rows' ids, ascending."""
        t = files_table.c
        with self.engine.connect() as c:
            return [int(i) for i in c.scalars(select(t.id).where(t.status == INDEXED).order_by(t.id))]

    def indexed_ids(self):
        """The indexed rows' ids, ascending, as an int64 numpy array."""
        import numpy as np  # here, not at module level: `index stats` / `verify` never need numpy

        return np.asarray(self.indexed_id_list(), dtype=np.int64)

    def ids_with_content(self, content_hash: str) -> list[int]:
        """Ids of the indexed rows whose content hash (SHA-256 hex of the file's bytes) is `content_hash`."""
        if not content_hash:
            return []
        with self.engine.connect() as c:
            rows = c.execute(with_content(content_hash, prefix=self.schema_version >= 3))
            return sorted(int(i) for i, h in rows if h == content_hash)

    def records(self, ids: Iterable[int]) -> dict[int, FileRecord]:
        ids = [int(i) for i in ids]
        out: dict[int, FileRecord] = {}
        with self.engine.connect() as c:
            for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
                chunk = ids[start:start + 900]
                for rec in c.execute(select(files_table).where(files_table.c.id.in_(chunk))):
                    out[rec.id] = rec
        return out

    def find(self, status: str | None = None, limit: int | None = None) -> list[FileRecord]:
        with self.engine.connect() as c:
            q = select(files_table).order_by(files_table.c.path)
            if status:
                q = q.where(files_table.c.status == status)
            if limit:
                q = q.limit(limit)
            return list(c.execute(q))

    def failure_reasons(self) -> dict[str, int]:
        """{kind: count} over failed rows (kind = the reason's prefix)."""
        out: dict[str, int] = {}
        t = files_table.c
        with self.engine.connect() as c:
            for (reason,) in c.execute(select(t.reason).where(t.status == FAILED)):
                kind = (reason or "unknown").split(":", 1)[0]
                out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def commit_changes(self, inserts: list[dict], updates: list[dict], meta: dict[str, Any]) -> None:
        """One transaction: insert new rows, update rows by id (each dict holds `id` and the columns to
        set), write meta. All or nothing."""
        try:
            with self.engine.begin() as c:
                if inserts:
                    c.execute(insert(files_table), inserts)
                by_columns: dict[tuple[str, ...], list[dict]] = {}
                for row in updates:
                    by_columns.setdefault(tuple(sorted(k for k in row if k != "id")), []).append(row)
                for columns, rows in by_columns.items():
                    # SET columns come from the parameter keys (the same for every row of this group)
                    stmt = update(files_table).where(files_table.c.id == bindparam("_id"))
                    c.execute(stmt, [{**{k: v for k, v in row.items() if k != "id"}, "_id": row["id"]}
                                     for row in rows])
                self.set_meta(meta, connection=c)
        except SQLAlchemyError as exc:
            raise CatalogError(f"catalog commit failed: {exc}") from exc


def ids_digest(ascending_ids) -> str:
    """SHA-256 (hex) of the ids in ascending order, each as a little-endian signed 64-bit integer.

    The writer records it with every index version (`meta["index"]["ids_sha256"]`), computed from the
    ids it stored in that version's file; `verify` recomputes it from the rows marked indexed, so that
    catalog rows and index file are checked to hold the same id set without decoding the index file.
    """
    import hashlib
    import sys
    from array import array

    if hasattr(ascending_ids, "dtype"):  # a numpy array (the writer): no Python loop over a million ids
        return hashlib.sha256(ascending_ids.astype("<i8", copy=False).tobytes()).hexdigest()
    packed = array("q", (int(i) for i in ascending_ids))
    if sys.byteorder != "little":
        packed.byteswap()
    return hashlib.sha256(packed.tobytes()).hexdigest()


def check_same_encoder(recorded: dict, identity: dict) -> None:
    for field in ("dim", "fingerprint", "name"):
        a, b = recorded.get(field), identity.get(field)
        if a is not None and b is not None and a != b:
            raise EncoderMismatchError(
                f"this gallery was embedded with {recorded.get('name')!r} (dim {recorded.get('dim')}, "
                f"weights {str(recorded.get('fingerprint'))[:12]}), not {identity.get('name')!r} "
                f"(dim {identity.get('dim')}, weights {str(identity.get('fingerprint'))[:12]}): "
                "encoders are never mixed in one index; build a new index directory for this encoder")


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<catalog url>"
