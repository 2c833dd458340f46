"""An IVF gallery with segments searched where its files lie: a mapped base plus mapped segment rows (issue 15).

An IVF gallery's live set is a base (a FAISS IndexIVFFlat file) followed by segments, each removing ids
(tombstones) and adding rows (index/segments.py). The copying reader loads the base and applies every
segment to it in memory. A reader (`Gallery.open` on the CPU) instead keeps the base's lists mapped
read-only (`VectorStore.read(mapped=True)`: FAISS cannot change mapped lists) and layers the segments on
top of it, nothing of either copied until certified search needs the rows in lists (then they are copied
into a FAISS IVF of the reader's own, 4·D bytes a row):

- `LayeredIVF`, the store: the base; `dead`, the base ids a later segment removed; `rows`, every
  segment's rows as views of the mapped segment files (an `index.mapped.MappedFlat`, whose own alive flags
  take the tombstones that hit earlier segments' rows). Its live (id, vector) pairs are the base's minus
  `dead`, then the alive rows: the same pairs as the copying reader's, whose segment rows sit in the lists
  the quantizer assigns them to instead (so equal scores may come in another order). Search: FAISS's
  search of the base skipping `dead` (an id selector), the rows scanned exhaustively, merged by score.
- `LayeredLists`, its certified lists (`certified_lists`, for `retrieval.ivf_search`): the base's FAISS
  lists (`CertifiedIVF.from_faiss`, scanned in C++) and the alive rows in a FAISS IVF of their own over the
  same centroids (each row in its nearest list; `from_faiss` again: exact radius bounds, C++ scans), one list
  number meaning both. Soundness rests on `CertifiedIVF`'s two proved facts, each applied to one part:
  * bound: U_c = max(U_c(base), U_c(rows)) ≥ every live item of list c, since the base's U_c bounds
    every item its list stores (dead ones included: a bound over a set bounds any subset) and the rows'
    U_c bounds theirs; −inf exactly where list c holds no live item;
  * scan contract (`CertifiedIVF.top_in_lists`): the base's scan drops the dead items it finds among its
    best (by their place in the lists, list << 32 | offset, known when the tombstone was applied: no id
    lookup), asking FAISS again for more while fewer than k are left (`CertifiedIVF._faiss_part`): an item
    it left out scores at most every one of the `wanted` best, k or more of them kept — or it returned every
    item the lists hold. The rows' scan keeps its own answer. Both honour the caller's exclusions. An item
    of the lists left out of the union of the answers was left out of its part's, so it scores at most k of
    that part's. (Both are scanned together, their parts on the scanning threads: `index.ivf.faiss_scans`.)
"""
from __future__ import annotations

import faiss
import numpy as np

from .errors import StoreError
from .gpu_scan import GpuCopy
from .row_parts import RowsOf
from .ivf import CertifiedIVF, faiss_scans
from .mapped import MappedFlat
from .store import VectorStore, _as_ids, check_queries

__all__ = ["LayeredIVF", "LayeredLists"]

ROWS_TAG = 1 << 62  # set in a `LayeredLists` ref that points into the rows' lists (refs are list << 32 | offset)


class LayeredLists:
    """Certified inverted lists of a `LayeredIVF`: the base's FAISS lists minus dead ids, plus the segment
    rows in lists of their own over the same centroids (module doc); `CertifiedIVF`'s reading interface."""

    def __init__(self, base: CertifiedIVF, rows: CertifiedIVF, dead_ids: np.ndarray, dead_refs: np.ndarray):
        self.base, self.rows = base, rows
        self.dead_ids = np.asarray(dead_ids, np.int64)  # base ids removed by a later segment
        self.dead_refs = np.asarray(dead_refs, np.int64)  # where each is stored in the base: list << 32 | offset
        self.dead_lists = self.dead_refs >> 32
        self.max_norm = max(base.max_norm, rows.max_norm)
        self.centroids = base.centroids
        live = base.list_sizes() - np.bincount(self.dead_lists, minlength=base.nlist)
        self._sizes = live + rows.list_sizes()

    @property
    def nlist(self) -> int:
        return self.base.nlist

    @property
    def dim(self) -> int:
        return self.base.dim

    def __len__(self) -> int:
        return int(self._sizes.sum())

    @property
    def rho(self) -> np.ndarray:
        """ρ_c ≥ ‖e_j − μ_c‖ for every live item of list c (each part's bound covers its own items)."""
        return np.maximum(self.base.rho, self.rows.rho)

    def list_sizes(self) -> np.ndarray:
        """Live items per list (nlist,)."""
        return self._sizes

    def contiguous(self):
        return None

    def upper_bounds(self, query) -> np.ndarray:
        """U_c ≥ every live item's score in list c (module doc); −inf for a list without live items."""
        u = np.maximum(self.base.upper_bounds(query), self.rows.upper_bounds(query))
        u[self._sizes == 0] = -np.inf
        return u

    def top_in_lists(self, query, lists, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """`CertifiedIVF.top_in_lists` over the live items of `lists` (its contract, module doc); refs into
        the rows' lists carry ROWS_TAG."""
        lists = np.asarray(lists, dtype=np.int64).reshape(-1)
        k = max(1, int(k))
        dead = self.dead_refs[np.isin(self.dead_lists, lists)]
        if self.base._faiss is not None and self.rows._faiss is not None:  # both scanned together, in C++
            q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
            exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
            (s_base, r_base), (s_rows, r_rows) = faiss_scans(q, [
                (self.base, lists[self.base.list_sizes()[lists] > 0], k, exclude, dead),
                (self.rows, lists[self.rows.list_sizes()[lists] > 0], k, exclude, ())])
        else:
            s_base, r_base = self.base.top_in_lists(query, lists, k + len(dead), exclude)
            if len(dead):  # of the k + d best, at most d are dead: k or more kept items beat every one left out
                live = ~np.isin(r_base, dead)
                s_base, r_base = s_base[live], r_base[live]
            s_rows, r_rows = self.rows.top_in_lists(query, lists, k, exclude)
        return np.concatenate([s_base, s_rows]), np.concatenate([r_base, r_rows | ROWS_TAG])

    def items(self, refs, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids (n,), vectors (n, D) float64 or None) of the items `top_in_lists` referred to."""
        refs = np.asarray(refs, dtype=np.int64).reshape(-1)
        in_rows = (refs & ROWS_TAG) != 0
        ids = np.empty(len(refs), np.int64)
        vecs = np.empty((len(refs), self.dim), np.float64) if vectors else None
        for part, pick, plain in ((self.base, ~in_rows, refs), (self.rows, in_rows, refs & ~ROWS_TAG)):
            if pick.any():
                got_ids, got_vecs = part.items(plain[pick], vectors)
                ids[pick] = got_ids
                if vectors:
                    vecs[pick] = got_vecs
        return ids, vecs

    def list_vectors(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of list c's live items: the base's alive ones, then the rows'."""
        ids, vecs = self.base.list_vectors(c)
        keep = ~np.isin(ids, self.dead_ids[self.dead_lists == c])
        more_ids, more_vecs = self.rows.list_vectors(c)
        return np.concatenate([ids[keep], more_ids]), np.concatenate([vecs[keep], more_vecs])

    def ids(self) -> np.ndarray:
        return np.concatenate([self.list_vectors(c)[0] for c in range(self.nlist)]) if self.nlist else \
            np.zeros(0, np.int64)


class LayeredIVF:
    """Read-only IVF store: a base VectorStore (lists mapped) with segments layered on it (module doc);
    VectorStore's reading interface."""

    kind = "ivf"
    read_only = True

    def __init__(self, base: VectorStore, use_gpu: bool = False):
        if base.kind != "ivf":
            raise StoreError(f"a layered store needs an IVF base, not {base.factory}")
        self.base = base
        self.factory, self.params = base.factory, base.params
        self.use_gpu = use_gpu
        self.rows = MappedFlat(base.dim)
        self._dead = np.zeros(0, np.int64)  # sorted
        self._dead_refs = np.zeros(0, np.int64)  # where each dead id is stored in the base: list << 32 | offset
        self._changed()

    def _changed(self) -> None:
        self.gpu = GpuCopy() if self.use_gpu else None  # every stored vector on torch's GPU, removed ones dead
        self._lists: LayeredLists | None = None
        self._selector = None  # FAISS's search of the base skips `dead` (built on first search)
        self._row_ids: np.ndarray | None = None  # the alive rows' ids, sorted (built on first reconstruct)

    # Opening: a segment's tombstones, then its rows -------------------------------------------
    def remove(self, ids) -> int:
        """Remove every live item under `ids` (a segment's tombstones): alive rows, and base ids not yet
        dead; how many."""
        ids = np.unique(_as_ids(ids))
        removed = self.rows.remove(ids) if self.rows.ntotal else 0
        direct = self.base.index.direct_map  # (VectorStore.read gives every IVF a hash-table map)
        fresh, refs = [], []
        for i in ids[~np.isin(ids, self._dead)].tolist():
            try:
                refs.append(direct.get(i))  # list << 32 | offset; raises for an id the base does not store
            except RuntimeError:
                continue
            fresh.append(i)
        if fresh:
            order = np.argsort(np.concatenate([self._dead, fresh]), kind="stable")
            self._dead = np.concatenate([self._dead, fresh])[order]
            self._dead_refs = np.concatenate([self._dead_refs, refs]).astype(np.int64)[order]
        if removed or fresh:  # (also rows only: the lists, the rows' ids and a GPU copy hold them)
            self._changed()
        return removed + len(fresh)

    def add(self, ids, vectors, stored: bool = False) -> None:
        """Append a segment's rows (read from a checked file: `stored=True` only; kept as the views they are)."""
        self.rows.add(ids, vectors, stored=stored)
        self._changed()

    # Facts ----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def ntotal(self) -> int:
        return self.base.ntotal - len(self._dead) + self.rows.ntotal

    def __len__(self) -> int:
        return self.ntotal

    @property
    def exact(self) -> bool:
        return self.base.exact

    def ids(self) -> np.ndarray:
        """All live ids: the base's alive ones in its storage order, then the rows'."""
        ids = self.base.ids()
        return np.concatenate([ids[~np.isin(ids, self._dead)], self.rows.ids()])

    def reconstruct(self, ids) -> np.ndarray:
        """Stored vectors (n, dim) float32 for `ids`; StoreError if an id is not live."""
        ids = _as_ids(ids)
        out = np.empty((len(ids), self.dim), np.float32)
        if self._row_ids is None:
            self._row_ids = np.sort(self.rows.ids())
        at = np.minimum(np.searchsorted(self._row_ids, ids), max(len(self._row_ids) - 1, 0))
        in_rows = self._row_ids[at] == ids if len(self._row_ids) else np.zeros(len(ids), bool)
        if in_rows.any():
            out[in_rows] = self.rows.reconstruct(ids[in_rows])
        rest = ids[~in_rows]
        if np.isin(rest, self._dead).any():
            raise StoreError(f"cannot reconstruct ids: id {int(rest[np.isin(rest, self._dead)][0])} is not stored")
        if len(rest):
            out[~in_rows] = self.base.reconstruct(rest)
        return out

    def max_norm(self) -> float:
        """M ≥ every live vector's norm: from the GPU copy's rows when searches run there, else from the certified
        lists (`index.ivf.norm_bound` of the same vectors either way). While another thread makes the copy this
        waits for it: a certified query on a newly opened IVF version waits that long (2.5 s at 10M; at a server's
        reload, the copy of the files the older version did not hold), where a Flat gallery's reads its mapped rows
        and does not wait."""
        if not self.ntotal:
            return 1.0
        copy = self.gpu.get(self, wait=True) if self.gpu is not None else None  # (one read: a failure may drop it)
        if copy is not None:
            return copy.max_norm
        return self.certified_lists().max_norm

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on torch's GPU (making the copy first, or waiting for the thread that makes it)."""
        return self.gpu is not None and self.ntotal > 0 and self.gpu.get(self, wait=True) is not None

    def row_parts(self):
        """(parts, row ids, dead rows) that the GPU copy and the int8 codes are made from (index/row_parts.py), one
        part a file, as `index.layout.file_starts` counts stored rows: the base's vectors in its storage order (read a
        chunk at a time through FAISS's reconstruct from the mapped lists), then each segment's rows as mapped; rows a
        later tombstone removed are dead. The live ones are `ids()`, in that order. A newer version shares the parts
        of the files both hold."""
        base_ids = np.asarray(self.base.ids(), np.int64)
        blocks, row_ids, row_dead = self.rows.row_parts()
        dead = np.concatenate([np.flatnonzero(np.isin(base_ids, self._dead)), len(base_ids) + row_dead])
        return [RowsOf(self.base, base_ids), *blocks], np.concatenate([base_ids, row_ids]), dead

    def certified_lists(self) -> LayeredLists:
        """The certified lists (module doc), built on first use: exact bounds from the stored vectors."""
        if self._lists is None:
            base = CertifiedIVF.from_faiss(self.base.index)
            ids = np.ascontiguousarray(self.rows.ids(), dtype=np.int64)
            vecs = np.ascontiguousarray(self.rows.reconstruct(ids), dtype=np.float32)
            # each row in its nearest list (any list keeps the bounds sound; the nearest keeps them tight), as the
            # copying reader's FAISS add does at open: ~2 s for 300,000 rows and 3,346 lists on 2 cores
            where = CertifiedIVF.assign(base.centroids, vecs).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
            # … held in a FAISS IVF over the same centroids, so that they too are scanned in C++ (`from_faiss`)
            quantizer = faiss.IndexFlatIP(self.dim)
            quantizer.add(base.centroids)
            index = faiss.IndexIVFFlat(quantizer, self.dim, base.nlist, faiss.METRIC_INNER_PRODUCT)
            index.is_trained = True
            if len(ids):
                index.add_core(len(ids), faiss.swig_ptr(vecs), faiss.swig_ptr(ids), faiss.swig_ptr(where))
            self._lists = LayeredLists(base, CertifiedIVF.from_faiss(index), self._dead, self._dead_refs)
            self._lists._keep = (quantizer, index)  # the IVF refers to its quantizer, which it does not own
        return self._lists

    # Search ---------------------------------------------------------------------------------
    def search(self, queries, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over the live items: (scores (n, k) float32 decreasing, ids (n, k) int64,
        −1 past the last). The base is searched by FAISS (its nprobe lists, every list when exact=True or
        nprobe ≥ nlist) skipping dead ids; the rows exhaustively; equal scores: the base's first. On torch's GPU
        (`on_gpu`): every search exhaustive, `index.gpu_scan.DeviceRows.top` over all live vectors; and so, for a
        store bound for the GPU (a copy not failed), is every search it answers on the CPU while its copy is being
        made: an answer does not depend on when it was asked."""
        q, k = check_queries(queries, self.dim, k)
        found = self.gpu.top(self, q, k) if self.gpu is not None and self.ntotal else None
        if found is not None:
            return found[0], found[1]
        exact = exact or (self.gpu is not None and not self.gpu.failed)
        nlist = self.base.index.nlist
        nprobe = nlist if exact else min(nlist, int(self.params.get("nprobe", 1)))
        if len(self._dead) and self._selector is None:
            batch = faiss.IDSelectorBatch(len(self._dead), faiss.swig_ptr(self._dead))  # (copies the ids)
            self._selector = (batch, faiss.IDSelectorNot(batch))  # the Not holds a pointer to the batch: keep both
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=self._selector[1]) if self._selector is not None \
            else faiss.SearchParametersIVF(nprobe=nprobe)
        scores, ids = self.base.index.search(q, k, params=params)
        if self.rows.ntotal:
            more_scores, more_ids = self.rows.search(q, k)
            scores, ids = np.concatenate([scores, more_scores], 1), np.concatenate([ids, more_ids], 1)
        floor = np.float32(-np.finfo(np.float32).max)
        scores = np.where(ids >= 0, np.maximum(scores, floor), floor)  # −1 pads last, at −FLT_MAX as FAISS's
        order = np.argsort(-scores.astype(np.float64) - (ids < 0), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
