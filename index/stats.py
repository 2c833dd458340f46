"""What `robret index stats` prints, read from the catalog alone (no FAISS, no torch: it starts fast)."""
from __future__ import annotations

from .catalog import safe_url
from .layout import IndexDir

__all__ = ["index_stats"]


def index_stats(index_dir) -> dict:
    """What `robret index stats` prints: root, encoder, file counts by status, failure kinds, index facts."""
    layout = IndexDir(index_dir)
    catalog = layout.open_catalog()
    try:
        meta = catalog.meta()
        version = int(meta["index"]["version"])
        path = layout.index_file(version)
        return {
            "index_dir": str(layout.path),
            "root": meta["root"],
            "source": meta.get("source") or {"kind": "folder", "list": None},
            "catalog": _display_url(layout),
            "schema_version": meta["schema_version"],
            "encoder": meta["encoder"],
            "files": catalog.counts(),
            "failures": catalog.failure_reasons(),
            "index": {**meta["index"], "bytes": path.stat().st_size if version and path.is_file() else 0},
            "limits": meta.get("limits"),
            "last_run": meta.get("last_run"),
        }
    finally:
        catalog.close()


def _display_url(layout: IndexDir) -> str:
    return safe_url(layout.catalog_url())
