"""What `robret index stats` prints, read from the catalog alone (no FAISS, no torch: it starts fast)."""
from __future__ import annotations

from .catalog import safe_url
from .layout import IndexDir, live_files

__all__ = ["index_stats"]


def index_stats(index_dir) -> dict:
    """What `robret index stats` prints: root, encoder, file counts by status, failure kinds, index facts."""
    layout = IndexDir(index_dir)
    catalog = layout.open_catalog()
    try:
        meta = catalog.meta()
        files = [layout.path / f["name"] for f in live_files(meta["index"])]
        return {
            "index_dir": str(layout.path),
            "root": meta["root"],
            "source": meta.get("source") or {"kind": "folder", "list": None},
            "catalog": _display_url(layout),
            "schema_version": meta["schema_version"],
            "encoder": meta["encoder"],
            "files": catalog.counts(),
            "failures": catalog.failure_reasons(),
            "index": {**meta["index"], "files": len(files), "bytes": sum(p.stat().st_size for p in files if p.is_file())},
            "limits": meta.get("limits"),
            "last_run": meta.get("last_run"),
        }
    finally:
        catalog.close()


def _display_url(layout: IndexDir) -> str:
    return safe_url(layout.catalog_url())
