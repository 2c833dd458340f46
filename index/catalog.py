"""The catalog (SQLAlchemy 2.x): one row per image file, plus the facts the index depends on.

Tables:
    robret_files   one row per file ever seen under the root: stable 64-bit id (= the FAISS id),
                   relative path, content hash, size, mtime, displayed width/height, status
                   (indexed / failed / removed), failure reason, notes, encoder, timestamps.
    robret_meta    key → JSON: schema_version, owner (the id of the one index directory using this
                   catalog) and index_dir, root, encoder identity, index {version, rows, sha256,
                   file, factory, requested, params, dim}, created_at, last_run.

The catalog owns the truth; the FAISS file is derived from it. A row is `indexed` exactly when its
id is in the index file of the committed `index.version` — ingest commits row changes and the new
index version in one transaction, after that index file is durably on disk (see ingest.py).
SQLite files run in WAL mode with synchronous=FULL. Any SQLAlchemy URL works; `path_key` is a
binary column (raw file-name bytes, so non-UTF-8 names round-trip), which SQLite and PostgreSQL
index directly.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
from typing import Any, Iterable

import numpy as np
from sqlalchemy import (BigInteger, DateTime, Integer, LargeBinary, String, Text, create_engine, event,
                        func, insert, inspect, select, update)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import CatalogError, EncoderMismatchError, SchemaVersionError

__all__ = ["SCHEMA_VERSION", "INDEXED", "FAILED", "REMOVED", "DB_URL_ENV", "Base", "FileRecord", "MetaEntry",
           "Catalog", "connect_url", "recorded_url", "safe_url", "utcnow"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_URL_ENV = "ROBRET_DB_URL"  # a catalog URL, possibly with its password, read from the environment only
INDEXED, FAILED, REMOVED = "indexed", "failed", "removed"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class MetaEntry(Base):
    __tablename__ = "robret_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)  # JSON


class FileRecord(Base):
    """One image file under the root (a tombstone once it disappears)."""

    __tablename__ = "robret_files"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # the FAISS id
    path_key: Mapped[bytes] = mapped_column(LargeBinary, unique=True)  # relative path, raw bytes
    path: Mapped[str] = mapped_column(Text)  # relative path for display (undecodable bytes as \xNN)
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # SHA-256 hex
    size: Mapped[int | None] = mapped_column(BigInteger)  # bytes
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)  # displayed size (after EXIF orientation)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)  # indexed | failed | removed
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed ("kind: detail")
    notes: Mapped[str | None] = mapped_column(Text)  # conversions applied ("; "-separated)
    encoder: Mapped[str | None] = mapped_column(String(200))  # encoder name that embedded it
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    embedded_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    def to_dict(self) -> dict:
        return {c.key: getattr(self, c.key) for c in inspect(FileRecord).column_attrs if c.key != "path_key"}


# Metadata keys every catalog has (and the fields each holds), checked at open.
REQUIRED_META = {"root": (), "encoder": ("spec", "name", "dim"),
                 "index": ("version", "rows", "dim", "factory", "sha256")}

# Columns ingest reads to plan an update, and writes back (with updated_at) for changed rows.
PLAN_COLUMNS = ("id", "path_key", "path", "content_hash", "size", "mtime_ns", "width", "height", "status",
                "reason", "notes", "encoder", "embedded_at")


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
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    # Opening --------------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, meta: dict[str, Any]) -> "Catalog":
        """Create the tables and write `meta` (plus schema_version and created_at)."""
        cat = cls(url)
        try:
            Base.metadata.create_all(cat.engine)
        except SQLAlchemyError as exc:
            raise CatalogError(f"cannot create the catalog at {safe_url(url)}: {exc}") from None
        if cat.meta():
            raise CatalogError(f"a catalog already exists at {safe_url(url)}")
        cat.set_meta({"schema_version": SCHEMA_VERSION, "created_at": utcnow().isoformat(), **meta})
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
            cat.check_schema()
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
        with self.sessions() as s:
            return {e.key: json.loads(e.value) for e in s.scalars(select(MetaEntry))}

    def set_meta(self, values: dict[str, Any], session: Session | None = None) -> None:
        def write(s: Session) -> None:
            for key, value in values.items():
                s.merge(MetaEntry(key=key, value=json.dumps(value, sort_keys=True)))

        if session is not None:
            write(session)
            return
        with self.sessions.begin() as s:
            write(s)

    def check_encoder(self, identity: dict) -> None:
        """Refuse an encoder other than the one recorded (name, dimension and weights fingerprint)."""
        recorded = self.meta().get("encoder")
        if recorded is None:
            raise CatalogError("the catalog records no encoder")
        check_same_encoder(recorded, identity)

    # Rows -----------------------------------------------------------------------------------
    def plan_rows(self) -> list[dict]:
        """Every row's planning columns (see PLAN_COLUMNS), as dicts."""
        cols = [getattr(FileRecord, c) for c in PLAN_COLUMNS]
        with self.sessions() as s:
            return [dict(zip(PLAN_COLUMNS, r)) for r in s.execute(select(*cols))]

    def max_id(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.max(FileRecord.id))) or 0)

    def counts(self) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(select(FileRecord.status, func.count()).group_by(FileRecord.status))
            out = {INDEXED: 0, FAILED: 0, REMOVED: 0}
            out.update({status: int(n) for status, n in rows})
            return out

    def indexed_ids(self) -> np.ndarray:
        with self.sessions() as s:
            ids = s.scalars(select(FileRecord.id).where(FileRecord.status == INDEXED)).all()
        return np.asarray(ids, dtype=np.int64)

    def ids_with_content(self, content_hash: str) -> list[int]:
        """Ids of the indexed rows whose content hash (SHA-256 hex of the file's bytes) is `content_hash`."""
        with self.sessions() as s:
            return sorted(s.scalars(select(FileRecord.id).where(FileRecord.content_hash == content_hash,
                                                                FileRecord.status == INDEXED)))

    def records(self, ids: Iterable[int]) -> dict[int, FileRecord]:
        ids = [int(i) for i in ids]
        out: dict[int, FileRecord] = {}
        with self.sessions() as s:
            for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
                chunk = ids[start:start + 900]
                for rec in s.scalars(select(FileRecord).where(FileRecord.id.in_(chunk))):
                    out[rec.id] = rec
        return out

    def find(self, status: str | None = None, limit: int | None = None) -> list[FileRecord]:
        with self.sessions() as s:
            q = select(FileRecord).order_by(FileRecord.path)
            if status:
                q = q.where(FileRecord.status == status)
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q))

    def failure_reasons(self) -> dict[str, int]:
        """{kind: count} over failed rows (kind = the reason's prefix)."""
        out: dict[str, int] = {}
        with self.sessions() as s:
            for (reason,) in s.execute(select(FileRecord.reason).where(FileRecord.status == FAILED)):
                kind = (reason or "unknown").split(":", 1)[0]
                out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def commit_changes(self, inserts: list[dict], updates: list[dict], meta: dict[str, Any]) -> None:
        """One transaction: insert new rows, update rows by id, write meta. All or nothing."""
        try:
            with self.sessions.begin() as s:
                if inserts:
                    s.execute(insert(FileRecord), inserts)
                if updates:
                    s.execute(update(FileRecord), updates)
                self.set_meta(meta, session=s)
        except SQLAlchemyError as exc:
            raise CatalogError(f"catalog commit failed: {exc}") from exc


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
