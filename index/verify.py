"""Prove that an index directory is consistent, without changing it (`robret index verify`).

Checks, each one a line in `problems` when it fails:
  schema       the catalog's schema version is one this code reads
  file         every file of the committed live set (a base, segments: index/layout.py) exists
  checksum     each one's SHA-256 equals the one committed with it
  segments     the recorded row counts of the live files add up to the version's row count
  rows         the number of rows marked indexed equals the recorded row count
  ids          the indexed rows' id set is the one committed with that version: the SHA-256 of the
               ascending ids (catalog.ids_digest) equals the digest the writer recorded from the ids it
               stored in that file
With `deep=True` (`robret index verify --deep`), for versions written before the writer recorded the
ids digest, and when a checksum does not match (to say how the files differ), the live files are also
decoded (FAISS, segments applied in order) and checked directly:
  rows         its vector count equals the recorded row count and the number of rows marked indexed
  ids          the index's id set equals the indexed rows' id set, with no id stored twice
  norms        every stored vector has unit norm (|‖v‖ − 1| ≤ NORM_TOLERANCE) and is finite
  dim          the index dimension equals the recorded encoder's
  type         the index type is the recorded one
Why the default is enough to trust the pair: the checksum proves that the file is, byte for byte, the
one the writer committed, and the digest that the catalog's indexed rows are the ids the writer stored
in it; the deep checks re-examine what the writer itself wrote (a bug in robret, not tampering or
corruption, would show there). The default needs neither FAISS nor numpy, so it starts in a third of a
second (docs/benchmarks.md); its cost is one pass over the file (SHA-256) and one over the ids.
A writer may commit meanwhile (its commit changes rows and the version in one transaction, then
deletes the old version's file). A report is therefore kept only if the committed version is the
same after every check as before them: version numbers only grow, so then no commit happened in
between and everything read belongs to one version. Otherwise the checks are run again on the new
version (a few times).
Leftover files of interrupted writes are reported as notes (harmless: the next writer deletes them).
`check_files=True` also stats every indexed file (present, same size) — folder drift, not corruption.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from encoder.io import file_sha256

from .catalog import INDEXED, Catalog, ids_digest
from .errors import FolderError, GalleryError
from .layout import BASE, IndexDir, live_files

__all__ = ["VerifyReport", "verify_index"]

log = logging.getLogger(__name__)
SNAPSHOT_ATTEMPTS = 20  # verify runs again while writers keep committing, at most this often


@dataclass
class VerifyReport:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    repairable: bool = True  # False when the catalog itself could not be read: repair cannot help

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "facts": self.facts,
                "repairable": self.repairable}


def verify_index(index_dir, check_files: bool = False, deep: bool = False) -> VerifyReport:
    """Verify an index directory (module doc); `deep` also decodes the index file and checks its
    vectors and ids directly."""
    report = VerifyReport()
    layout = IndexDir(index_dir)
    try:
        catalog = layout.open_catalog()
    except GalleryError as exc:
        report.fail(f"schema: {exc}")
        report.repairable = False
        return report
    try:
        for attempt in range(SNAPSHOT_ATTEMPTS):
            report = VerifyReport()
            _verify(layout, catalog, report, check_files, deep)
            if catalog.meta()["index"]["version"] == report.facts["version"]:
                return report  # nothing was committed while this version was read: a consistent snapshot
            log.info("a writer committed while version %s was being verified; verifying the new one",
                     report.facts["version"])
            time.sleep(0.01 * (attempt + 1))
        report.notes.append(f"a writer committed {SNAPSHOT_ATTEMPTS} new versions while this ran: "
                            "the report may mix them; run verify again when the writer is done")
    finally:
        catalog.close()
    return report


def _verify(layout: IndexDir, catalog: Catalog, report: VerifyReport, check_files: bool, deep: bool) -> None:
    meta = catalog.meta()
    index_meta = meta["index"]
    version = int(index_meta["version"])
    indexed = catalog.indexed_id_list()
    report.facts.update(version=version, recorded_rows=int(index_meta["rows"]), indexed_rows=len(indexed),
                        factory=index_meta["factory"], counts=catalog.counts())
    for leftover in layout.leftovers(index_meta):
        report.notes.append(f"leftover from an interrupted write: {leftover.name}")
    files = live_files(index_meta)
    report.facts["files"] = len(files)
    if version == 0:
        if len(indexed) or int(index_meta["rows"]):
            report.fail(f"rows: version 0 has no index file, yet {len(indexed)} rows are marked indexed")
        return
    tampered = missing = False
    for f in files:
        path = layout.path / f["name"]
        if not path.is_file():
            report.fail(f"file: {path.name} (version {version}) is missing")
            missing = True
            continue
        try:
            digest = file_sha256(path)
        except OSError as exc:  # e.g. deleted by a writer that compacted meanwhile
            report.fail(f"file: {path.name} (version {version}) cannot be read: {exc.strerror or exc}")
            missing = True
            continue
        if digest != f.get("sha256"):
            tampered = True
            report.fail(f"checksum: {path.name} has SHA-256 {digest[:16]}…, the catalog recorded "
                        f"{str(f.get('sha256'))[:16]}…")
    if missing:
        return
    total = sum(int(f["rows"]) if f["kind"] == BASE else int(f["rows"]) - int(f.get("removed", 0)) for f in files)
    if total != int(index_meta["rows"]):
        report.fail(f"segments: the live files record {total} vectors in all; version {version} recorded "
                    f"{index_meta['rows']}")
    if len(indexed) != int(index_meta["rows"]):
        report.fail(f"rows: {len(indexed)} rows are marked indexed; version {version} recorded {index_meta['rows']}")
    recorded_ids = index_meta.get("ids_sha256")
    if recorded_ids is not None and ids_digest(indexed) != recorded_ids:
        report.fail(f"ids: the rows marked indexed are not the {index_meta['rows']} ids committed with version "
                    f"{version} (their SHA-256 differs from the recorded one)")
    deep = deep or recorded_ids is None or tampered  # files that are not the committed ones: say how they differ
    report.facts["checks"] = "deep" if deep else "checksum+ids"
    if deep:
        _verify_files(layout, meta, index_meta, indexed, report)
    if check_files:
        _check_files(catalog, meta, report)


def _verify_files(layout: IndexDir, meta: dict, index_meta: dict, indexed_list: list[int],
                  report: VerifyReport) -> None:
    """The deep checks: decode the live files (FAISS, segments applied) and compare vectors and ids with
    the catalog."""
    import numpy as np

    from .segments import load_live_store
    from .store import NORM_TOLERANCE

    indexed = np.asarray(indexed_list, dtype=np.int64)
    try:
        store = load_live_store(layout, index_meta, use_gpu=False, check=False)
    except GalleryError as exc:
        report.fail(f"file: {exc}")
        return
    report.facts["ntotal"] = store.ntotal
    if store.dim != int(meta["encoder"]["dim"]):
        report.fail(f"dim: index dimension {store.dim} ≠ encoder dimension {meta['encoder']['dim']}")
        return
    if store.ntotal != int(index_meta["rows"]) or store.ntotal != len(indexed):
        report.fail(f"rows: index holds {store.ntotal} vectors; catalog recorded {index_meta['rows']} and marks "
                    f"{len(indexed)} rows indexed")
    ids = store.ids()
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        report.fail(f"ids: {int((counts > 1).sum())} ids stored more than once (e.g. {int(uniq[counts > 1][0])})")
    extra = np.setdiff1d(uniq, indexed)
    missing = np.setdiff1d(indexed, uniq)
    if len(extra):
        report.fail(f"ids: {len(extra)} index entries have no indexed row (orphans, e.g. {int(extra[0])})")
    if len(missing):
        report.fail(f"ids: {len(missing)} indexed rows have no vector (lost, e.g. {int(missing[0])})")
    bad = 0
    for start in range(0, len(uniq), 65536):
        chunk = store.reconstruct(uniq[start:start + 65536])
        norms = np.linalg.norm(chunk.astype(np.float64), axis=1)
        bad += int(np.sum(~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOLERANCE)))
    if bad:
        report.fail(f"norms: {bad} stored vectors are not unit-norm")
    if store.factory != index_meta["factory"]:
        report.fail(f"type: index is {store.factory}, catalog recorded {index_meta['factory']}")


def _check_files(catalog: Catalog, meta: dict, report: VerifyReport) -> None:
    """With `check_files`: stat every indexed file (present, same size and mtime): folder drift, noted."""
    root = os.fsencode(meta["root"])
    gone = changed = 0
    try:
        listed = _listed_objects(root)
    except FolderError as exc:  # an object store that cannot be listed now: drift unknown, noted
        report.notes.append(f"files not checked: {exc}")
        return
    for rec in catalog.find(INDEXED):
        if listed is not None:
            st = listed.get(rec.path_key)
            if st is None:
                gone += 1
            else:
                changed += int(st != (rec.size, rec.mtime_ns))
            continue
        try:
            st = os.stat(os.path.join(root, rec.path_key))
        except OSError:
            gone += 1
            continue
        changed += int(st.st_size != rec.size or st.st_mtime_ns != rec.mtime_ns)
    if gone or changed:
        report.notes.append(f"folder changed since the last update: {gone} indexed files missing, "
                            f"{changed} modified (run `robret index update`)")


def _listed_objects(root: bytes) -> dict[bytes, tuple[int, int]] | None:
    """{key: (size, mtime_ns)} under an object-store root (one listing); None for a local root. Imported
    here, not at the top: verify stays free of pyarrow, numpy and torch for a local index."""
    from .remote import is_remote, list_objects, parse_uri

    if not is_remote(root):
        return None
    return {rel.encode(): (size, mtime_ns) for rel, size, mtime_ns in list_objects(parse_uri(root))}
