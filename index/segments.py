"""Segment files: what one checkpoint changed, appended to the live set (DESIGN.md, "Index and catalog").

A segment holds the ids whose earlier vectors one checkpoint removed (tombstones) and the (id, vector)
rows it added, in one little-endian binary file:

    offset 0   b"RBSEG001"                       magic (8 bytes)
    offset 8   dim u32, n_removed u64, n_added u64
    offset 28  removed ids   int64[n_removed]     applied first (an id may be removed, then re-added)
               added ids     int64[n_added]
               vectors       float32[n_added, dim] exactly as the writer's index stored them

so its size is `segment_bytes(dim, n_removed, n_added)` = 28 + 8·(n_removed + n_added) + 4·dim·n_added:
a checkpoint writes only what changed since the previous one. The file is written to a temporary name,
fsynced, renamed into place and the directory fsynced (encoder.io.atomic_write) before the catalog
commit that names it; it is never rewritten. Reading checks its SHA-256 on the opened descriptor (the
bytes checked are the bytes parsed), then its header against its size.

Opening a gallery applies the live set in order: the base (a whole FAISS index, when there is one),
then each segment's tombstones and rows. Applied to the state the previous files leave, each segment
yields exactly the state its checkpoint had in memory; by induction the live set yields the committed
state (the ids digest and row count recorded with the version check the result).

On an IVF base, a segment's rows are added through the base's trained quantizer (each to its nearest
list) and its tombstones removed from their lists (a reader layers them on the mapped base instead,
index/mapped_ivf.py, with the same live pairs). Certified IVF search stays sound whatever list a row
lands in: the radius bounds ρ_c and the norm bound M it uses (index/ivf.py `CertifiedIVF.from_faiss`)
are computed at open from the exact float32 vectors every list then holds, so ρ_c ≥ ‖e_j − μ_c‖ for
every stored e_j, segment rows included; nothing recorded in a file is trusted for a bound. (In memory,
`CertifiedIVF.add` keeps the same invariant by only ever raising ρ_c and M; `remove` leaves them, an
upper bound over a set being one over any subset.)
"""
from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import faiss
import numpy as np

from encoder.io import atomic_write, fd_sha256

from .errors import IntegrityError, StoreError
from . import gpu_scan
from .layout import BASE, ROWS, live_files
from .mapped import MappedFlat
from .mapped_ivf import LayeredIVF
from .store import VectorStore, map_checked, open_checked

__all__ = ["MAGIC", "Segment", "segment_bytes", "write_segment", "read_segment", "map_segment", "load_live_store"]

MAGIC = b"RBSEG001"
_HEADER = struct.Struct("<IQQ")
HEADER_BYTES = len(MAGIC) + _HEADER.size  # 28


def segment_bytes(dim: int, n_removed: int, n_added: int) -> int:
    """The exact size of a segment file."""
    return HEADER_BYTES + 8 * (n_removed + n_added) + 4 * dim * n_added


class Segment:
    """A parsed segment: `removed` (r,) int64, `ids` (n,) int64, `vectors` (n, dim) float32."""

    def __init__(self, removed: np.ndarray, ids: np.ndarray, vectors: np.ndarray):
        self.removed, self.ids, self.vectors = removed, ids, vectors

    def __len__(self) -> int:
        return len(self.ids)


def write_segment(path: str | os.PathLike, dim: int, removed, ids, vectors, *, midway=None,
                  before_replace=None) -> tuple[str, int]:
    """Write a segment durably at `path` (temporary file, fsync, rename, directory fsync); returns its
    (SHA-256 hex, size in bytes). `midway()` runs with only part of the file written and nothing fsynced
    (a crash hook: a torn temporary file); `before_replace(tmp)` once the temporary file is durable."""
    removed = np.ascontiguousarray(np.asarray(removed, dtype="<i8").reshape(-1))
    ids = np.ascontiguousarray(np.asarray(ids, dtype="<i8").reshape(-1))
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype="<f4").reshape(len(ids), dim))
    digest = []

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _HEADER.pack(dim, len(removed), len(ids)))
            f.write(removed.tobytes())
            f.write(ids.tobytes())
            if midway is not None:
                f.flush()
                midway()
            f.write(vectors.tobytes())

    def durable(tmp: Path) -> None:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            digest.append(fd_sha256(fd))
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace(tmp)

    atomic_write(path, fill, before_replace=durable)
    return digest[0], segment_bytes(dim, len(removed), len(ids))


def read_segment(path: str | os.PathLike, dim: int, sha256: str | None) -> Segment:
    """Read a segment; with `sha256`, only if its bytes have that digest (else IntegrityError naming
    repair). A file whose size disagrees with its header is a StoreError."""
    path = Path(path)
    fd = open_checked(path, sha256)
    try:
        size = os.fstat(fd).st_size
        blocks, offset = [], 0
        while offset < size and (block := os.pread(fd, min(1 << 26, size - offset), offset)):
            blocks.append(block)
            offset += len(block)
        data = b"".join(blocks)
    finally:
        os.close(fd)
    if offset != size:
        raise StoreError(f"index file {path.name} changed size while it was read; "
                         f"run `robret index repair --index-dir {path.parent}`")
    removed, ids, vectors = _parse(path, data, dim)
    return Segment(removed.astype(np.int64), ids.astype(np.int64), vectors.astype(np.float32))


def map_segment(path: str | os.PathLike, dim: int, sha256: str | None) -> Segment:
    """`read_segment`'s checks and answer, its arrays read-only views of the file mapped through the
    descriptor whose digest was checked (index/mapped.py); each view holds the mapping open."""
    path = Path(path)
    return Segment(*_parse(path, map_checked(path, sha256), dim))


def _parse(path: Path, data, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed, ids, vectors) as views of `data` (a segment file's bytes), after checking its magic,
    its header against its size and its dimension against the catalog's (StoreError naming repair)."""
    size = len(data)
    if size < HEADER_BYTES or bytes(data[:len(MAGIC)]) != MAGIC:
        raise StoreError(f"index file {path.name} is not a robret segment; "
                         f"run `robret index repair --index-dir {path.parent}`")
    file_dim, n_removed, n_added = _HEADER.unpack_from(data, len(MAGIC))
    if file_dim != dim or size != segment_bytes(dim, n_removed, n_added):
        raise StoreError(f"index file {path.name} has dimension {file_dim} and {size} bytes, which do not agree "
                         f"with its header or the catalog (dimension {dim}); "
                         f"run `robret index repair --index-dir {path.parent}`")
    at = HEADER_BYTES
    removed = np.frombuffer(data, "<i8", n_removed, at)
    at += 8 * n_removed
    ids = np.frombuffer(data, "<i8", n_added, at)
    at += 8 * n_added
    vectors = np.frombuffer(data, "<f4", n_added * dim, at).reshape(n_added, dim)
    return removed, ids, vectors


def load_live_store(layout, index_meta: dict, use_gpu: bool = True, check: bool = True,
                    mapped: bool = False) -> VectorStore | MappedFlat:
    """The index the catalog's committed live set describes (an empty flat index when it names no file).

    Every file is checked against what the catalog recorded with the version before anything is derived
    from it: present (StoreError naming repair), its SHA-256 (IntegrityError naming repair), its row
    count, then the whole index's dimension and row count. The base is read with FAISS; each segment's
    tombstones are removed (each must hit a stored id) and its rows added bit for bit. Every open that
    answers queries (Gallery.open) or writes (build, update, repair, compact) comes here, so no answer and
    no new version is derived from files that are not the ones committed. check=False (verify --deep)
    reads whatever the files hold, to report how they differ.
    mapped=True (readers): a Flat gallery's files are memory-mapped into a read-only `MappedFlat`
    (index/mapped.py) instead of copied into a VectorStore, after the same checks; an IVF gallery gets a
    read-only VectorStore over its base's mapped lists (`VectorStore.read(mapped=True)`), wrapped, when
    segments follow, in a `LayeredIVF` (index/mapped_ivf.py) that layers their mapped rows and tombstones on it;
    always wrapped on a GPU that torch sees and FAISS does not, where the LayeredIVF searches every vector.
    """
    version, dim = int(index_meta["version"]), int(index_meta["dim"])
    files = live_files(index_meta)
    # IVF: the base's lists mapped (FAISS cannot add to them), segments layered on top (LayeredIVF)
    map_ivf = (mapped and check and index_meta["factory"].startswith("IVF") and bool(files) and files[0]["kind"] == BASE
               and not (use_gpu and faiss.get_num_gpus() > 0))  # (FAISS moves a copying store to its GPU)
    torch_gpu = map_ivf and use_gpu and gpu_scan.scan_device() is not None  # (FAISS sees none: map_ivf)
    mapped = mapped and check and index_meta["factory"] == "Flat"
    kind = MappedFlat if mapped else VectorStore
    read_base = MappedFlat.read if mapped else functools.partial(VectorStore.read, mapped=map_ivf)
    read_rows = map_segment if mapped or map_ivf else read_segment
    store = None
    for position, f in enumerate(files):
        path = layout.path / f["name"]
        if not path.is_file():
            raise StoreError(f"index file {path.name} (version {version}) is missing; run `robret index repair`")
        if check and not f.get("sha256"):
            raise IntegrityError(f"the catalog records no checksum for {path.name}; run `robret index repair`")
        sha256 = f.get("sha256") if check else None
        if f["kind"] == BASE and position == 0:
            store = read_base(path, index_meta["factory"], index_meta.get("params"), use_gpu=use_gpu, sha256=sha256)
            added = store.ntotal
            if map_ivf and (len(files) > 1 or torch_gpu):  # (on torch's GPU, LayeredIVF searches the vectors there)
                store = LayeredIVF(store, use_gpu=torch_gpu)
            if store.dim != dim:
                raise StoreError(f"index file has dimension {store.dim}, the catalog says {dim}")
        elif f["kind"] == ROWS:
            segment = read_rows(path, dim, sha256)
            if store is None:
                store = kind.create(dim, "Flat", index_meta.get("params"), use_gpu=use_gpu)
            removed = store.remove(segment.removed)
            if check and removed != len(segment.removed):
                raise StoreError(f"index file {path.name} removes {len(segment.removed)} ids of which only {removed} "
                                 "are stored; run `robret index repair`")
            store.add(segment.ids, segment.vectors, stored=True)
            added = len(segment)
        else:
            raise StoreError(f"the catalog names {path.name} as a {f['kind']!r} file at position {position}; "
                             "run `robret index repair`")
        if check and added != int(f["rows"]):
            raise StoreError(f"index file {path.name} holds {added} vectors, the catalog recorded {f['rows']}; "
                             "run `robret index repair`")
    if store is None:
        store = kind.create(dim, "Flat", use_gpu=use_gpu)
    if check and store.factory != index_meta["factory"]:
        raise StoreError(f"the live files make a {store.factory} index, the catalog recorded {index_meta['factory']}; "
                         "run `robret index repair`")
    if check and store.ntotal != int(index_meta["rows"]):
        raise StoreError(f"index file holds {store.ntotal} vectors, the catalog recorded {index_meta['rows']}; "
                         "run `robret index repair`")
    return store
