"""What an index directory holds, and the writer lock.

    DIR/robret-index.json      {"format": "robret-index", "layout": 1, "catalog": URL or null,
                                "root": folder, "encoder": spec, "index_type": requested type,
                                "owner": this index's id (also in its catalog)}
                               The catalog URL is recorded without its password (catalog.connect_url).
    DIR/catalog.sqlite         the catalog when no other SQLAlchemy URL was given (WAL mode)
    DIR/vectors.<version>.faiss  a base: a whole FAISS index, written by the checkpoint (or compaction)
                               of that catalog version
    DIR/segment.<version>.rows   a segment: the rows one checkpoint added and the ids it removed
                               (tombstones), append-only (index/segments.py)
    DIR/.lock                  held (flock) by the one process allowed to write

The live set is what the catalog's committed `index.segments` names, in order: at most one base
first, then segments, each with its SHA-256 and row count (`live_files`). Indexes written before
segments record no `segments`: their one live file is `vectors.<version>.faiss` (read as a base).
Every other `vectors.*` / `segment.*` file and every temporary file (`<name>.<random>.tmp`) is a
leftover of an interrupted write or of a compaction's last step; writers delete them when they
open the directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from encoder.io import atomic_write_text

from .catalog import Catalog, connect_url, safe_url
from .errors import CatalogError, IndexLockedError

__all__ = ["IndexDir", "CONFIG_NAME", "DEFAULT_CATALOG"]

CONFIG_NAME = "robret-index.json"
DEFAULT_CATALOG = "catalog.sqlite"
_VECTORS = re.compile(r"^(?:vectors\.(\d+)\.faiss|segment\.(\d+)\.rows)$")
# encoder.io.atomic_write's temporary names
_VECTORS_TMP = re.compile(r"^(?:vectors\.\d+\.faiss|segment\.\d+\.rows)(\.\w+)?\.tmp$")
BASE, ROWS = "faiss", "rows"  # the two kinds of live file


def live_files(index_meta: dict) -> list[dict]:
    """The committed live set, in load order: [{"name", "kind" (BASE or ROWS), "sha256", "rows", ...}].

    `rows` is the number of vectors a base holds, or the number a segment adds (its tombstones are
    `removed`). An index written before segments existed records only `file`/`sha256`/`rows`: its one
    file is read as a base. Version 0 has no file. Pure Python: `verify` and `stats` use it without numpy.
    """
    version = int(index_meta["version"])
    if version == 0:
        return []
    if "segments" in index_meta:
        return [dict(f) for f in index_meta["segments"]]
    return [{"name": index_meta.get("file") or f"vectors.{version:08d}.faiss", "kind": BASE,
             "sha256": index_meta.get("sha256"), "rows": int(index_meta["rows"]), "version": version}]



def common_files(old_live: list[dict], new_live: list[dict]) -> int:
    """How many leading files two versions' live sets share: equal name, kind, SHA-256, rows and removed.

    What sharing an older version's int8 codes and GPU copy rests on
    (`index.gallery.Gallery.prepare_search(previous=…)`, index/row_parts.py). Shared
    files are the same bytes (each is checked against its SHA-256 when opened), hence the same rows at the same
    places — the first `file_starts(live)[c]` stored rows of either store — and the same tombstones among them.
    Files after them only remove (a tombstone kills every earlier row stored under its id: `MappedFlat.remove`,
    `LayeredIVF.remove`) or add rows after them. Claim: an id alive among the shared rows in both versions is
    alive there at the same row, so its vector is the same. Proof: let X be alive at row r in the older version
    and at row r' in the newer, both shared rows. A later file's tombstone for X would kill both rows in that
    version, so neither version has one; the alive X rows among the shared rows are then those the shared files
    alone leave alive, the same set in both, and a live set holds an id once: r = r'. ∎
    Readers give their rows one part a file that adds rows (`index.row_parts.row_parts`; an IVF base alone, a
    read-only store, is one part), so the shared files are the same leading parts in both versions. What is shared is still checked part by part (`index.row_parts.Layout.shares`: same bounds, ids, and
    the older version's dead rows among the newer's; and the first and last rows).
    """
    keys = ("name", "kind", "sha256", "rows", "removed")
    common = 0
    while (common < min(len(old_live), len(new_live)) and old_live[common].get("sha256")  # (none recorded: unknown)
           and all(old_live[common].get(k) == new_live[common].get(k) for k in keys)):
        common += 1
    return common


def file_starts(live: list[dict]) -> list[int]:
    """Stored rows before each file of a live set and after the last: [0, r₀, r₀ + r₁, …] (`rows` is what a base
    holds or a segment adds; readers store each file's rows after the previous file's)."""
    starts = [0]
    for f in live:
        starts.append(starts[-1] + int(f["rows"]))
    return starts


class IndexDir:
    """Paths inside one index directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    def exists(self) -> bool:
        return self.config_path.is_file()

    def index_file(self, version: int) -> Path:
        """The base file a checkpoint or compaction of `version` writes."""
        return self.path / f"vectors.{version:08d}.faiss"

    def segment_file(self, version: int) -> Path:
        """The segment file a checkpoint of `version` writes."""
        return self.path / f"segment.{version:08d}.rows"

    def read_config(self) -> dict:
        if not self.exists():
            raise CatalogError(f"{self.path} is not a robret index directory (no {CONFIG_NAME}); "
                               "create one with `robret index build FOLDER --index-dir DIR`")
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as exc:
            raise CatalogError(f"unreadable {self.config_path}: {exc}") from None
        if not isinstance(config, dict) or config.get("format") != "robret-index":
            raise CatalogError(f"{self.config_path} is not a robret index configuration")
        for key in ("root", "encoder"):
            if not isinstance(config.get(key), str) or not config[key]:
                raise CatalogError(f"{self.config_path} has no {key!r} (it was altered): restore it, or "
                                   "build a new index directory")
        if not isinstance(config.get("catalog"), (str, type(None))):
            raise CatalogError(f"{self.config_path} has an invalid 'catalog' entry")
        return config

    def write_config(self, catalog_url: str | None, root: str, encoder: str, index_type: str,
                     owner: str | None = None, source: dict | None = None) -> dict:
        """Written once, first, atomically: enough to (re)create the catalog if creation is interrupted.

        `owner` is this index's id, recorded in its catalog too: a catalog is used only by the index
        directory whose id it records (see `open_catalog`). `source`: what is indexed under `root` (a
        folder, or a list of files: index/sources.py `Source.to_meta`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        config = {"format": "robret-index", "layout": 1, "catalog": catalog_url, "root": root, "encoder": encoder,
                  "index_type": index_type, "owner": owner, "source": source}
        atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
        return config

    def catalog_url(self, config: dict | None = None) -> str:
        """The catalog's SQLAlchemy URL to connect with: the configured one (recorded without a password;
        see catalog.connect_url for where the password comes from), else the SQLite file in this directory."""
        url = (config if config is not None else self.read_config()).get("catalog")
        return connect_url(url) if url else f"sqlite:///{self.path / DEFAULT_CATALOG}"

    def open_catalog(self, read_only: bool = True, config: dict | None = None, url: str | None = None) -> Catalog:
        """This directory's catalog (at `url`, else the configured one), refused (CatalogError) when it
        belongs to another index directory."""
        config = config if config is not None else self.read_config()
        catalog = Catalog.open(url or self.catalog_url(config), read_only=read_only)
        try:
            self.check_owner(catalog.meta(), config)
            if not read_only:
                catalog.migrate()  # an older schema brought up to date (only a catalog found to be this one's)
        except BaseException:
            catalog.close()
            raise
        return catalog

    def check_owner(self, meta: dict, config: dict) -> None:
        """Several index directories may share a database server, never one catalog: its recorded
        owner id must be this directory's (indexes made before owner ids have none on either side)."""
        if meta.get("owner") != config.get("owner"):
            raise CatalogError(
                f"the catalog {safe_url(self.catalog_url(config))} belongs to another index "
                f"(created for {meta.get('index_dir') or 'an unknown directory'}), not to {self.path}: "
                "each index needs a catalog of its own (another --db database), and using that one "
                "from here would break the other index")

    def leftovers(self, live: int | dict) -> list[Path]:
        """Files of interrupted writes and of finished compactions: temporary files, and base or segment
        files outside the live set. `live` is the committed index metadata (exact: every file it does
        not name), or only its version number (then files of later versions, never committed, and bases
        of other versions when no segment exists; files of earlier versions may be live segments)."""
        if isinstance(live, dict):
            names = {f["name"] for f in live_files(live)}
            version = None
        else:
            names, version = {f"vectors.{int(live):08d}.faiss"}, int(live)
        found, entries = [], []
        with contextlib.suppress(FileNotFoundError):
            entries = list(self.path.iterdir())
        segmented = any(_VECTORS.match(p.name) and _VECTORS.match(p.name).group(2) for p in entries)
        for p in entries:
            m = _VECTORS.match(p.name)
            if _VECTORS_TMP.match(p.name):
                found.append(p)
            elif m and p.name not in names:
                if version is None or int(m.group(1) or m.group(2)) > version or (m.group(1) and not segmented):
                    found.append(p)
        return sorted(found)

    @contextlib.contextmanager
    def writer_lock(self):
        """Exclusive, non-blocking: a second writer gets IndexLockedError. Released on exit or death."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexLockedError(f"{self.path} is being written by another process") from None
            yield
        finally:
            os.close(fd)
