"""A flat gallery searched where its files lie: the live files memory-mapped, not copied (issue 15).

`Gallery.open` (queries, `robret serve`, the UI) of a Flat gallery on the CPU gets a `MappedFlat`
instead of a `VectorStore`: the base file's ids and float32 rows are views of the file mapped read-only
(`flat_base_views`, which checks FAISS's layout field by field; FAISS's own reader would copy the ids
and build a hash table of them, ~50 bytes a vector) and each segment's ids and rows are views of the
segment file mapped read-only (`index.segments.map_segment`). Nothing of a base is copied, only one
alive flag a row (and the ids of segments, when there are any): a process holds about 5 bytes a vector
of its own while it answers a certified query (the flags and the scan's float32 scores) instead of
4·D + ~60 (D = 129: 568), readers of one gallery share the page cache, and the kernel may drop clean pages
under memory pressure and read them back (docs/benchmarks.md, "Opening a gallery: copied vs mapped").

Soundness is unchanged. Every file is checked against its committed SHA-256 through the descriptor that
is then mapped (`open_checked`), as `load_live_store` does for the copying reader; index files are never
rewritten in place (a new version is a new file renamed into place) and a file a writer deletes stays
readable through an existing mapping, so the mapped bytes are the checked bytes for as long as they are
mapped. The live state is the same as the copying reader's: the blocks (base, then each segment's rows)
in load order, where a segment's tombstones clear the alive flag of the rows with those ids in earlier
blocks, exactly the rows `VectorStore.remove` deletes. Alive rows in block order are then the copying
store's rows in storage order (IndexFlat's removal keeps the order of what stays, additions append), so
`search` ranks equal scores the same way and every score is the float32 inner product of the same two
vectors by the same kernel: bit for bit the copying store's, except for D = 2, 4 or 8, where FAISS's kernel
sums rows in batches whose grouping depends on a row's place in its array, so a score may differ in its
last bits (within `encoder.certify.float32_dot_error`, the bound certificates use, in any summation order).
The base's rows and ids start wherever FAISS's file format puts them (not always on a 4- or 8-byte
boundary); FAISS's kernels and numpy load them unaligned, which x86-64 and ARM64 allow. Mapped memory is read-only (PROT_READ): the
views are marked not writeable, and files are never truncated or rewritten in place (which would make a
mapped read fault).

Read-only: `add` accepts only rows read from a checked file (`stored=True`, while opening) and there is no
`write`; writers (build, update, repair, compact) keep loading a `VectorStore`.

On a GPU (torch sees CUDA, `use_gpu`): the first search copies the rows to the GPU from the mapped files, chunk by
chunk (`index.gpu_scan.DeviceRows`), checks the copy's arithmetic (`index.store.gpu_arithmetic_ratio`) and then
answers every search there, in the same order as `scan_top`; if the copy fails (no memory, say) or its check does,
robret warns once and searches on the CPU; a search that fails on the GPU runs on the CPU (`index.gpu_scan.GpuCopy`).
"""
from __future__ import annotations

import struct
from pathlib import Path

import faiss
import numpy as np

from .errors import StoreError
from .ivf import norm_bound
from . import gpu_scan
from .gpu_scan import GpuCopy
from .store import (CHUNK_ROWS, FLAT_SCAN_MAX_QUERIES, _as_ids, check_queries, default_params, map_checked,
                    no_answers, scan_top)

__all__ = ["MappedFlat", "flat_base_views"]

RECENT_MAX = 1 << 16  # rows of recent search answers remembered for `reconstruct`


class MappedFlat:
    """Read-only flat store over mapped blocks of (ids, float32 rows); VectorStore's reading interface."""

    kind = "flat"
    factory = "Flat"
    exact = True
    read_only = True

    def __init__(self, dim: int, params: dict | None = None, use_gpu: bool = False):
        self._dim = int(dim)
        self.params = {**default_params("Flat"), **(params or {})}
        self.use_gpu = use_gpu and gpu_scan.scan_device() is not None  # (asked for, and a GPU torch sees)
        self._blocks: list[np.ndarray] = []  # (n_b, dim) float32 views (mapped)
        self._starts = [0]  # block b holds rows _starts[b] .. _starts[b+1] − 1
        self._ids = np.zeros(0, np.int64)  # per row, every block
        self._alive = np.zeros(0, bool)
        self._changed()

    # Construction -------------------------------------------------------------------------
    @classmethod
    def read(cls, path, factory: str, params: dict | None = None, use_gpu: bool = False,
             sha256: str | None = None) -> "MappedFlat":
        """A base file (IndexIDMap2(IndexFlatIP), as `VectorStore.write` wrote it) mapped through the
        descriptor `open_checked` checked; its ids and rows, views of the file (`flat_base_views`), become
        block 0. Nothing of the base is copied: FAISS's reader would copy the ids and build a hash table of
        them (~50 bytes a vector)."""
        if factory != "Flat":
            raise StoreError(f"index file {path} is not a flat inner-product index; run `robret index repair`")
        ids, rows = flat_base_views(Path(path), map_checked(path, sha256))
        store = cls(rows.shape[1], params, use_gpu)
        store._append(ids, rows)
        return store

    @classmethod
    def create(cls, dim: int, factory: str = "Flat", params: dict | None = None, use_gpu: bool = False) -> "MappedFlat":
        return cls(dim, params, use_gpu)

    def _append(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if len(ids) != len(rows) or rows.ndim != 2 or rows.shape[1] != self._dim or rows.dtype != np.float32:
            raise StoreError(f"{len(ids)} ids for rows of shape {rows.shape} {rows.dtype}")
        if not rows.flags.c_contiguous:
            raise StoreError("mapped rows must be C-contiguous")
        self._blocks.append(rows)
        self._starts.append(self._starts[-1] + len(rows))
        ids = np.asarray(ids, np.int64)
        self._ids = np.concatenate([self._ids, ids]) if len(self._ids) else ids  # (a first block's: mapped)
        self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        self._changed()

    def _changed(self) -> None:
        """Rows or flags changed (only while opening): recompute or drop what is derived from them."""
        self._dead = np.flatnonzero(~self._alive)  # cleared rows, never taken by a search
        self._n_alive = len(self._alive) - len(self._dead)
        self._lookup = None  # (sorted alive ids, their rows), built on the first reconstruct that needs it
        self._recent: dict[int, int] = {}  # id → row of recent search answers (reconstructed next, to certify)
        self.gpu = GpuCopy() if self.use_gpu else None  # (made from the final rows, at the first search)

    def add(self, ids, vectors, stored: bool = False) -> None:
        """Append a block of rows read from a checked file (`stored=True` only), kept as they are (a view of
        a mapped segment holds its mapping)."""
        if not stored:
            raise StoreError("a mapped gallery is read-only: open it with a writer to add vectors")
        ids = _as_ids(ids)
        if len(ids):
            self._append(ids, np.asarray(vectors))

    def remove(self, ids) -> int:
        """Clear the alive flag of every alive row under `ids` (a segment's tombstones); how many."""
        ids = _as_ids(ids)
        if len(ids) == 0 or not len(self._ids):
            return 0
        hit = np.isin(self._ids, ids) & self._alive
        self._alive &= ~hit
        self._changed()
        return int(hit.sum())

    # Facts ----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return self._n_alive

    def __len__(self) -> int:
        return self.ntotal

    def ids(self) -> np.ndarray:
        """All alive ids, int64, in storage order (the copying store's order)."""
        return self._ids[self._alive]

    def reconstruct(self, ids) -> np.ndarray:
        """Stored vectors (n, dim) float32 for `ids` (a copy); StoreError if an id is absent."""
        ids = _as_ids(ids)
        blocks = self._blocks
        out = np.empty((len(ids), self._dim), np.float32)
        if len(ids) == 0:
            return out
        want = self._recent_rows(ids)
        if want is None:
            want = self._lookup_rows(ids)
        block = np.searchsorted(self._starts, want, side="right") - 1
        for b in np.unique(block):
            sel = np.flatnonzero(block == b)
            out[sel] = blocks[b][want[sel] - self._starts[b]]
        return out

    def _recent_rows(self, ids: np.ndarray) -> np.ndarray | None:
        """Rows of `ids` when every one was in a recent search answer (rows never move once opened), so
        that certifying a search does not first sort every id (~0.1 s a million); else None."""
        recent = self._recent
        if len(ids) > RECENT_MAX or not recent:
            return None
        try:
            return np.fromiter((recent[int(i)] for i in ids), np.int64, len(ids))
        except KeyError:
            return None

    def _lookup_rows(self, ids: np.ndarray) -> np.ndarray:
        if self._lookup is None:
            rows = np.flatnonzero(self._alive)
            order = np.argsort(self._ids[rows], kind="stable")
            self._lookup = (self._ids[rows][order], rows[order])
        keys, rows = self._lookup
        at = np.minimum(np.searchsorted(keys, ids), max(len(keys) - 1, 0))
        if len(keys) == 0 or not np.array_equal(keys[at], ids):
            missing = ids[keys[at] != ids] if len(keys) else ids
            raise StoreError(f"cannot reconstruct ids: id {int(missing[0])} is not stored")
        return rows[at]

    def _remember(self, rows: np.ndarray) -> None:
        if len(self._recent) + len(rows) > RECENT_MAX:
            self._recent = {}
        self._recent.update(zip(self._ids[rows].tolist(), rows.tolist()))

    def max_norm(self) -> float:
        """M ≥ every alive row's ℓ2 norm (`index.ivf.norm_bound`, one chunk of alive rows at a time; 1.0
        when empty). A GPU copy took such a bound of its rows as it copied them (`DeviceRows.max_norm`): it is read
        from there rather than computed again."""
        copy = self.gpu.copy if self.gpu is not None else None
        if copy is not None and self.ntotal:
            return copy.max_norm
        top = 0.0
        for b, rows in enumerate(self._blocks):
            alive = self._alive[self._starts[b]:self._starts[b + 1]]
            for at in range(0, len(rows), CHUNK_ROWS):
                live = alive[at:at + CHUNK_ROWS]
                chunk = rows[at:at + CHUNK_ROWS]
                top = max(top, norm_bound(chunk if live.all() else chunk[live]))
        return top if self.ntotal else 1.0

    # Search ---------------------------------------------------------------------------------
    def search(self, queries, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over the alive rows, as `VectorStore.search` on the same gallery:
        (scores (n, k) float32 decreasing, ids (n, k) int64), −1 with score −FLT_MAX past the last row.

        On a GPU (`on_gpu`): `index.gpu_scan.DeviceRows.top`, any number of queries, in scan_top's order.
        Else fewer than FLAT_SCAN_MAX_QUERIES queries: `index.store.scan_top` over the blocks in place, cleared
        rows dead (equal scores: lower row first, the copying store's storage order). More queries: FAISS's blocked search of each block for its top
        k + (its cleared rows), cleared rows dropped, merged by decreasing score (stable: block order).
        """
        q, k = check_queries(queries, self._dim, k)
        blocks = self._blocks
        n = self.ntotal
        if n == 0:
            return no_answers(len(q), k)
        found = self.gpu.top(self, q, k) if self.gpu is not None else None
        if found is not None:
            scores, ids, rows = found
            if rows.size <= RECENT_MAX:
                self._remember(rows.ravel())
            return scores, ids
        if len(q) < FLAT_SCAN_MAX_QUERIES:
            scores, ids, rows = scan_top(q, k, self._dim, [(faiss.swig_ptr(r), len(r)) for r in blocks], self._ids,
                                         self._dead)
            self._remember(rows.ravel())
            return scores, ids
        take = min(k, n)
        out_scores, out_ids = no_answers(len(q), k)
        parts_s, parts_r = [], []
        for b, rows in enumerate(blocks):
            alive = self._alive[self._starts[b]:self._starts[b + 1]]
            if not alive.any():
                continue
            kb = min(len(rows), take + int((~alive).sum()))
            s, r = faiss.knn(q, rows, kb, metric=faiss.METRIC_INNER_PRODUCT)
            keep = (r >= 0) & alive[np.maximum(r, 0)]
            parts_s.append(np.where(keep, s, -np.inf))
            parts_r.append(np.where(keep, r + self._starts[b], -1))
        scores, rows = np.concatenate(parts_s, axis=1), np.concatenate(parts_r, axis=1)
        for i in range(len(q)):
            order = np.argsort(-scores[i], kind="stable")[:take]
            out_scores[i, :take], out_ids[i, :take] = scores[i, order], self._ids[rows[i, order]]
        return out_scores, out_ids

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on the GPU (making the copy first, or waiting for the thread that makes it)."""
        return self.gpu is not None and self._n_alive > 0 and self.gpu.get(self, wait=True) is not None

    def row_parts(self):
        """(parts, row ids, dead rows) that the GPU copy and the int8 codes are made from (index/row_parts.py): the
        mapped blocks as they are, one part each (the base, then each segment that adds rows: files a newer version
        may share)."""
        return self._blocks, self._ids, self._dead


_FOURCC = struct.Struct("<4s")
_HEADER = struct.Struct("<iqqqBi")  # d, ntotal, two unused 2²⁰, is_trained (1), metric (write_index_header)
_COUNT = struct.Struct("<Q")  # a vector's length before its data (WRITEVECTOR / WRITEXBVECTOR)


def flat_base_views(path: Path, data) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, rows (n, d) float32) as read-only views of `data`, the bytes of a FAISS file of
    IndexIDMap2(IndexFlatIP) in FAISS's own layout (faiss/impl/index_write.cpp, little-endian):
        "IxM2", header, "IxFI", header, count n·d, n·d float32 rows, count n, n int64 ids,
    header = d (int32), ntotal (int64), two unused int64, is_trained (1 byte, 1), metric (int32; 0 = inner
    product, which has no metric argument after it). Every field is checked against the others and the
    file's size, so another index type, metric or layout is refused (StoreError naming repair) rather
    than guessed at. Tests check the views against FAISS's own reader of the same file."""
    size = len(data)
    head = 2 * (_FOURCC.size + _HEADER.size) + _COUNT.size
    bad = StoreError(f"index file {path.name} is not a flat inner-product index as robret writes it; "
                     f"run `robret index repair --index-dir {path.parent}`")
    if size < head:
        raise bad
    outer, inner = _FOURCC.unpack_from(data, 0)[0], _FOURCC.unpack_from(data, _FOURCC.size + _HEADER.size)[0]
    h1 = _HEADER.unpack_from(data, _FOURCC.size)
    h2 = _HEADER.unpack_from(data, 2 * _FOURCC.size + _HEADER.size)
    d, n = h1[0], h1[1]
    if (outer, inner) != (b"IxM2", b"IxFI") or h1 != h2 or d <= 0 or n < 0 or h1[4] != 1 or h1[5] != 0:
        raise bad
    rows_at = head
    ids_at = rows_at + 4 * n * d + _COUNT.size
    if (size != ids_at + 8 * n or _COUNT.unpack_from(data, head - _COUNT.size)[0] != n * d
            or _COUNT.unpack_from(data, ids_at - _COUNT.size)[0] != n):
        raise bad
    rows = np.frombuffer(data, "<f4", n * d, rows_at).reshape(n, d)
    ids = np.frombuffer(data, "<i8", n, ids_at)
    return ids, rows
