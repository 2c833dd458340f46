"""What an index directory holds, and the writer lock.

    DIR/robret-index.json      {"format": "robret-index", "layout": 1, "catalog": URL or null,
                                "root": folder, "encoder": spec, "index_type": requested type,
                                "owner": this index's id (also in its catalog)}
                               The catalog URL is recorded without its password (catalog.connect_url).
    DIR/catalog.sqlite         the catalog when no other SQLAlchemy URL was given (WAL mode)
    DIR/vectors.<version>.faiss  the FAISS index; <version> is the catalog's index version
    DIR/.lock                  held (flock) by the one process allowed to write

Only the file named by the catalog's committed version is live. Other `vectors.*` files and their
temporary files (`vectors.<version>.faiss.<random>.tmp`) are leftovers of an interrupted write;
writers delete them when they open the directory.
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
_VECTORS = re.compile(r"^vectors\.(\d+)\.faiss$")
_VECTORS_TMP = re.compile(r"^vectors\.\d+\.faiss(\.\w+)?\.tmp$")  # encoder.io.atomic_write's temporary names


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
        return self.path / f"vectors.{version:08d}.faiss"

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

    def leftovers(self, live_version: int) -> list[Path]:
        """Files of interrupted writes: index versions other than the live one, and temporary files."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.path.iterdir():
                m = _VECTORS.match(p.name)
                if (m and int(m.group(1)) != live_version) or _VECTORS_TMP.match(p.name):
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
