"""Inverted lists with certified radius bounds: the data behind certified IVF search (DESIGN.md, "Certificates").

An IVF partition of unit vectors: centroids μ_c (nlist, D) float32 and, for every list c, its items'
exact float32 vectors and ids, plus
    ρ_c ≥ max_{j ∈ c} ‖e_j − μ_c‖      (a radius bound),       M ≥ max_j ‖e_j‖   (a norm bound).
Life cycle of the bounds: ρ_c exact (up to an upward float allowance) and M within γ_{D+1} relative
(`norm_bound`, from float32 squared norms) when computed from the vectors (`build`, `from_lists`,
`recompute_bounds`, which `repair` uses); `add` only raises them (max with the
new items' distances); `remove` leaves them alone — an upper bound over a set stays one over any subset.

Bound on a list (the heart of certified IVF search; `upper_bounds`). For a query q (any float32
vector, ‖q‖ ≈ 1) and every stored e_j in list c, in exact arithmetic on the stored float32 values:
    ⟨q, e_j⟩ = ⟨q, μ_c⟩ + ⟨q, e_j − μ_c⟩ ≤ ⟨q, μ_c⟩ + ‖q‖·‖e_j − μ_c‖ ≤ ⟨q, μ_c⟩ + ‖q‖·ρ_c    (Cauchy–Schwarz).
The computed U_c must not fall below that right-hand side:
- ⟨q, μ_c⟩ is computed in float32 (any summation order, FMA or not): its error is at most
  γ_D·‖q‖·‖μ_c‖ = `encoder.certify.float32_dot_error(D, max‖μ‖, ‖q‖)` (Higham §3.1), added to U_c;
- ‖q‖ and ρ_c are computed in float64 from float32 values (relative error ≤ (D + 2)·2⁻⁵³ ≈ 1e-13 for
  D ≤ 10⁴) and then inflated by the factor 1 + REL_ALLOWANCE (1e-9) and the term ABS_ALLOWANCE (1e-12);
  M is bounded by `norm_bound` (proved in its docstring);
- the float64 sum t_c + err + ‖q‖ρ_c of three terms of magnitude ≤ 3 is exact to ~1e-15, inside ABS_ALLOWANCE.
So U_c ≥ max_{j ∈ c} ⟨q, e_j⟩ for the exact scores that certificates use (`encoder.certify`: scores
recomputed in float64 from the same float32 vectors; their own ~1e-15 error is in ARITHMETIC_SLACK).

Storage: in memory (lists of arrays), or saved to a directory (`save`) and opened memory-mapped
(`open`), list by list contiguous: `vectors.npy` (N, D) float32 and `ids.npy` (N,) int64 sorted by list,
`offsets.npy` (nlist + 1,), `centroids.npy`, `rho.npy`, and `manifest.json` with every file's SHA-256.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from encoder.certify import float32_dot_error
from encoder.io import atomic_write_text, fd_sha256, fsync_dir

from .errors import IntegrityError, StoreError

__all__ = ["CertifiedIVF", "REL_ALLOWANCE", "ABS_ALLOWANCE", "exact_radius_bounds", "norm_bound", "faiss_scans"]

REL_ALLOWANCE = 1e-9  # upward relative allowance on float64 norms of float32 data (errors ~1e-13)
ABS_ALLOWANCE = 1e-12  # upward absolute allowance on float64 sums of a few terms of magnitude ≤ 3
_FILES = ("centroids", "rho", "offsets", "ids", "vectors")
FORMAT = "robret-certified-ivf"


def _up(x):
    """Inflate a float64 norm of float32 data so it is an upper bound on the exact value (module doc)."""
    return np.asarray(x, dtype=np.float64) * (1 + REL_ALLOWANCE) + ABS_ALLOWANCE


def exact_radius_bounds(centroid: np.ndarray, vectors: np.ndarray) -> float:
    """ρ = max_j ‖e_j − μ‖ over `vectors` (n, D) float32 for one centroid (D,), computed in float64 and
    inflated upwards (module doc); 0.0 for an empty list."""
    if len(vectors) == 0:
        return 0.0
    diff = np.asarray(vectors, dtype=np.float64) - np.asarray(centroid, dtype=np.float64)
    return float(_up(np.sqrt(np.einsum("ij,ij->i", diff, diff).max())))


def norm_bound(vectors: np.ndarray, chunk: int = 1 << 16) -> float:
    """M ≥ max_j ‖e_j‖ over float32 rows (n, D), from FAISS's float32 squared norms; 0.0 for no rows.

    s_j = fl32(Σ_i e_ji²), summed in any order with or without FMA, satisfies
        |s_j − ‖e_j‖²| ≤ γ_{D+1}·Σ_i |e_ji·e_ji| = γ_{D+1}·‖e_j‖²     (Higham §3.1; `float32_dot_error`),
    as long as nothing underflows; gradual underflow adds at most 2⁻¹⁵⁰ per product, D·2⁻¹⁴⁹ in all. So
        ‖e_j‖² ≤ (s_j + D·2⁻¹⁴⁹)/(1 − γ_{D+1}),
    and M is the square root of the largest right-hand side, computed in float64 and inflated by `_up`
    (its own rounding is ~1e-16). For D = 129, γ ≈ 7.8e-6: M exceeds the exact largest norm by at most
    ~8e-6 relative, and it reads each row once in float32 (~30× faster than a float64 pass).
    """
    rows = np.asarray(vectors)
    if len(rows) == 0:
        return 0.0
    dim, top = rows.shape[1], 0.0
    out = np.empty(min(chunk, len(rows)), np.float32)
    for at in range(0, len(rows), chunk):
        part = np.ascontiguousarray(rows[at:at + chunk], dtype=np.float32)
        faiss.fvec_norms_L2sqr(faiss.swig_ptr(out), faiss.swig_ptr(part), dim, len(part))
        top = max(top, float(out[:len(part)].max()))
    gamma = float32_dot_error(dim, 1.0, 1.0)
    return float(_up(np.sqrt((top + dim * 2.0 ** -149) / (1 - gamma))))


@dataclass
class _List:
    ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, D) float32 (a view into a memory map when opened from disk)


class CertifiedIVF:
    """Inverted lists of exact float32 unit vectors with radius bounds ρ_c and a norm bound M (module doc)."""

    def __init__(self, centroids: np.ndarray, lists: list[_List], rho: np.ndarray, max_norm: float):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.lists = lists
        self.rho = np.asarray(rho, dtype=np.float64)
        self.max_norm = float(max_norm)
        self._centroid_norm = float(np.linalg.norm(self.centroids.astype(np.float64), axis=1).max()) * (
            1 + REL_ALLOWANCE) + ABS_ALLOWANCE if len(self.centroids) else 0.0
        self._where: dict[int, int] | None = None  # id → list, built on first removal
        self._whole: tuple[np.ndarray, np.ndarray] | None = None  # (ids, vectors) of every list, when contiguous
        self._faiss = None  # the FAISS IVF whose lists these are (`from_faiss`), while unchanged
        self._sizes: np.ndarray | None = None  # `list_sizes`, until the lists change

    # Construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, vectors, nlist: int, seed: int = 0, sample: int = 100_000, niter: int = 10) -> np.ndarray:
        """Spherical k-means centroids (nlist, D) on (a sample of) unit vectors (FAISS Kmeans)."""
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if len(x) < nlist:
            raise StoreError(f"IVF{nlist} needs at least {nlist} vectors to train, got {len(x)}")
        if len(x) > sample:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
        km = faiss.Kmeans(x.shape[1], nlist, niter=niter, seed=seed, spherical=True, verbose=False)
        km.train(x)
        return km.centroids

    @staticmethod
    def assign(centroids: np.ndarray, vectors, batch: int = 65536) -> np.ndarray:
        """List of each vector: argmax_c ⟨e, μ_c⟩ (the assignment is free: the bounds hold for any)."""
        q = faiss.IndexFlatIP(centroids.shape[1])
        q.add(np.ascontiguousarray(centroids, dtype=np.float32))
        out = np.empty(len(vectors), np.int64)
        for s in range(0, len(vectors), batch):
            out[s:s + batch] = q.search(np.ascontiguousarray(vectors[s:s + batch], dtype=np.float32), 1)[1][:, 0]
        return out

    @classmethod
    def from_lists(cls, centroids, lists: list[tuple[np.ndarray, np.ndarray]]) -> "CertifiedIVF":
        """From given lists [(ids, vectors float32)] and their centroids: bounds computed exactly."""
        centroids = np.asarray(centroids, dtype=np.float32)
        if len(lists) != len(centroids):
            raise ValueError(f"{len(lists)} lists for {len(centroids)} centroids")
        made = [_List(np.asarray(i, dtype=np.int64).reshape(-1), np.asarray(v, dtype=np.float32)) for i, v in lists]
        rho = np.array([exact_radius_bounds(c, lst.vectors) for c, lst in zip(centroids, made)], dtype=np.float64)
        norm = max([norm_bound(lst.vectors) for lst in made] + [0.0])
        return cls(centroids, made, rho, norm)

    @classmethod
    def build(cls, ids, vectors, nlist: int, seed: int = 0) -> "CertifiedIVF":
        """Train centroids on `vectors` (n, D) unit float32, assign every vector, compute exact bounds."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        centroids = cls.train(vectors, nlist, seed)
        where = cls.assign(centroids, vectors)
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(nlist + 1))
        lists = [(ids[order[a:b]], vectors[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]
        return cls.from_lists(centroids, lists)

    @classmethod
    def from_faiss(cls, index) -> "CertifiedIVF":
        """A view of a FAISS IndexIVFFlat (its centroids and its lists' exact float32 vectors, not copied,
        read-only): the bounds are computed exactly from what the index stores. This object holds the index
        (whose lists may be mapped from a file), which must not change while it is used."""
        owner, index = index, faiss.extract_index_ivf(index)  # the proxy extracted does not own the index
        d, nlist = index.d, index.nlist
        centroids = index.quantizer.reconstruct_n(0, nlist)
        invlists = index.invlists
        lists = []
        for c in range(nlist):
            n = invlists.list_size(c)
            if n == 0:
                lists.append((np.zeros(0, np.int64), np.zeros((0, d), np.float32)))
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(c), n).view(np.int64)
            codes = faiss.rev_swig_ptr(invlists.get_codes(c), n * d * 4).view(np.float32).reshape(n, d)
            ids.flags.writeable = codes.flags.writeable = False  # mapped lists are read-only memory
            lists.append((ids, codes))
        ivf = cls.from_lists(centroids, lists)
        ivf._owner = owner  # the views above point into it
        if isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
            ivf._faiss = index  # scans its own lists in C++ (`top_in_lists`): its scores are inner products
        return ivf

    # Facts ----------------------------------------------------------------------------------
    @property
    def nlist(self) -> int:
        return len(self.centroids)

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def __len__(self) -> int:
        return sum(len(lst.ids) for lst in self.lists)

    def ids(self) -> np.ndarray:
        return np.concatenate([lst.ids for lst in self.lists]) if self.lists else np.zeros(0, np.int64)

    def contiguous(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids (N,), vectors (N, D)) of all lists back to back when stored so (opened from disk, unchanged
        since), for scanning most lists in one product; None otherwise."""
        return self._whole

    def list_vectors(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), exact float32 vectors (n, D)) of list c."""
        lst = self.lists[c]
        return lst.ids, lst.vectors

    def list_sizes(self) -> np.ndarray:
        """Items in each list (nlist,) int64 (kept until the lists change)."""
        if self._sizes is None:
            self._sizes = np.fromiter((len(lst.ids) for lst in self.lists), np.int64, self.nlist)
        return self._sizes

    # Scanning lists -------------------------------------------------------------------------
    def top_in_lists(self, query, lists, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """The best float32 scores fl32⟨q, e_j⟩ over the items of `lists` (ids in `exclude` left out):
        (scores (h,) float32, refs (h,) int64), in no particular order, ref = list << 32 | offset in it
        (`items` reads them back).

        Contract, which certified search relies on (retrieval/ivf_search.py, the pool): every item of these
        lists that is neither returned nor excluded scores at most k of the returned scores. (So when the lists
        hold at most k items, all are returned.) Every score is the float32 inner product of the query with a
        stored vector, summed in some order, so `float32_dot_error` bounds its error as for any other score.
        How:
        - lists of a FAISS IVF (`from_faiss`, unchanged since): FAISS scans them in C++ with its top-k heap
          (`search_preassigned`, labels returned as list/offset pairs) for the top k + |exclude|, then drops the
          excluded ones (FAISS refuses an id selector with pairs), asking again for more while fewer than k are
          left (an id may be stored more than once): an item left out scores at most the ≥ k kept ones. Above 2·SPLIT_MIN items the lists are cut into parts of
          ≥ SPLIT_MIN items scanned on parallel threads (FAISS runs one query on one thread), each part
          returning its own top: an item left out of its part's answer scores at most k kept items of that
          part, so the contract holds for the union. (Measured: 1M vectors in 4,000 lists, ~19 ms on two
          threads against ~31 ms on one; docs/benchmarks.md);
        - otherwise FAISS's kernel scores every item (one pass over a contiguous store when every non-empty
          list is asked for) and `index.store.top_rows` keeps the k best.
        """
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
        lists = np.asarray(lists, dtype=np.int64).reshape(-1)
        exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
        k = max(1, int(k))
        sizes = self.list_sizes()
        lists = lists[sizes[lists] > 0]
        if len(lists) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if self._faiss is not None:
            return faiss_scans(q, [(self, lists, k, exclude, ())])[0]
        # The lists' items back to back (a contiguous store: all of them, in storage order), then the k best.
        if self._whole is not None and len(np.unique(lists)) == int(np.sum(sizes > 0)):
            lists = np.arange(self.nlist)
            ids, vecs = self._whole
            scores = _kernel_scores(q, vecs)
        else:
            scores = np.concatenate([_kernel_scores(q, self.lists[c].vectors) for c in lists])
            ids = np.concatenate([self.lists[c].ids for c in lists]) if len(exclude) else None
        rows = np.flatnonzero(~np.isin(ids, exclude)) if len(exclude) else np.arange(len(scores))
        if len(rows) > k:
            from .store import top_rows  # (index.store imports this module)

            rows = rows[top_rows(scores[rows] if len(exclude) else scores, k)]
        starts = np.concatenate([[0], np.cumsum(sizes[lists])])
        at = np.searchsorted(starts, rows, side="right") - 1  # which of `lists` each kept row is in
        return scores[rows], (lists[at] << 32) | (rows - starts[at])

    def _faiss_part(self, q, lists, k: int, exclude, drop=()) -> tuple[np.ndarray, np.ndarray]:
        """`top_in_lists` over one part, by FAISS: its top `wanted` items, excluded ids and the items at the
        refs `drop` (list << 32 | offset: a layered store's dead items, index/mapped_ivf.py) dropped, asking
        again for twice as many while fewer than k are left of a full answer (an excluded id may be stored
        more than once; `drop` is expected to be rare among the best). Every item left out then scores at
        most the k or more kept ones."""
        held = int(self.list_sizes()[lists].sum())
        drop = np.asarray(drop, dtype=np.int64)
        wanted = min(held, k + len(exclude) + min(len(drop), max(16, k // 8)))
        while True:
            scores, refs = _faiss_top(self._faiss, q, lists, wanted)
            if len(exclude) or len(drop):
                kept = ~np.isin(self.items(refs, vectors=False)[0], exclude) if len(exclude) else \
                    np.ones(len(refs), bool)
                if len(drop):
                    kept &= ~np.isin(refs, drop)
                scores, refs = scores[kept], refs[kept]
            if len(scores) >= k or wanted >= held:
                return scores, refs
            wanted = min(held, 2 * wanted)

    def items(self, refs, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids (n,) int64, vectors (n, D) float64 or None) of the items `top_in_lists` referred to."""
        refs = np.asarray(refs, dtype=np.int64).reshape(-1)
        ids = np.empty(len(refs), np.int64)
        vecs = np.empty((len(refs), self.dim), np.float64) if vectors else None
        for n, (c, off) in enumerate(zip((refs >> 32).tolist(), (refs & 0xFFFFFFFF).tolist())):
            lst = self.lists[c]
            ids[n] = lst.ids[off]
            if vectors:
                vecs[n] = lst.vectors[off]
        return ids, vecs

    # Changes --------------------------------------------------------------------------------
    def add(self, ids, vectors) -> None:
        """Append vectors (n, D) unit float32 to their nearest lists; ρ_c and M only ever increase."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        self._whole = self._faiss = self._sizes = None
        where = self.assign(self.centroids, vectors)
        for c in np.unique(where):
            pick = where == c
            lst = self.lists[c]
            self.lists[c] = _List(np.concatenate([lst.ids, ids[pick]]), np.concatenate([lst.vectors, vectors[pick]]))
            self.rho[c] = max(self.rho[c], exact_radius_bounds(self.centroids[c], vectors[pick]))
            if self._where is not None:
                self._where.update((int(i), int(c)) for i in ids[pick])
        self.max_norm = max(self.max_norm, norm_bound(vectors))

    def remove(self, ids) -> int:
        """Remove every item under `ids`; the bounds are left as they are (still upper bounds)."""
        if self._where is None:
            self._where = {int(i): c for c, lst in enumerate(self.lists) for i in lst.ids}
        by_list: dict[int, set[int]] = {}
        for i in np.asarray(ids, dtype=np.int64).reshape(-1):
            c = self._where.pop(int(i), None)
            if c is not None:
                by_list.setdefault(c, set()).add(int(i))
        removed = 0
        if by_list:
            self._whole = self._faiss = self._sizes = None
        for c, drop in by_list.items():
            lst = self.lists[c]
            keep = ~np.isin(lst.ids, list(drop))
            removed += int((~keep).sum())
            self.lists[c] = _List(lst.ids[keep], lst.vectors[keep])
        return removed

    def recompute_bounds(self) -> None:
        """Exact bounds again (repair): ρ_c and M shrink back to what the current items need."""
        self.rho = np.array([exact_radius_bounds(c, lst.vectors) for c, lst in zip(self.centroids, self.lists)])
        self.max_norm = max([norm_bound(lst.vectors) for lst in self.lists] + [0.0])

    # The bound ------------------------------------------------------------------------------
    def upper_bounds(self, query) -> np.ndarray:
        """U_c ≥ max_{j ∈ c} ⟨q, e_j⟩ for every list c (nlist,) float64; −inf for an empty list (module doc):

            U_c = fl32⟨q, μ_c⟩ + γ_D·‖q‖·max‖μ‖ + ‖q‖·ρ_c,  norms inflated upwards.
        """
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
        qn = float(_up(np.linalg.norm(q.astype(np.float64))))
        t = _kernel_scores(q, self.centroids).astype(np.float64)  # (not BLAS: its idle threads spin)
        err = float32_dot_error(self.dim, self._centroid_norm, qn)
        u = t + err + qn * self.rho + ABS_ALLOWANCE
        u[self.list_sizes() == 0] = -np.inf
        return u

    # Files ----------------------------------------------------------------------------------
    def save(self, path) -> dict:
        """Write the lists contiguously (list by list) into the new directory `path` (`write_streamed`)."""
        def chunks():
            for lst in self.lists:
                yield lst.ids, lst.vectors

        def where():
            for c, lst in enumerate(self.lists):
                yield np.full(len(lst.ids), c, np.int64)

        return _write_lists(path, self.centroids, chunks, where, self.rho, self.max_norm)

    @classmethod
    def write_streamed(cls, path, centroids, chunks) -> dict:
        """Build a saved certified IVF larger than memory: `chunks()` yields (ids (n,), unit vectors (n, D)
        float32) and is called twice (assignment, then placement), so it must give the same data each time.
        Vectors are assigned to their nearest centroid, written list by list into memory-mapped files, and
        ρ_c computed exactly and M bounded (`norm_bound`) on the way (max over each chunk, module doc).
        Returns the manifest."""
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        c64 = centroids.astype(np.float64)
        assigned: list[np.ndarray] = []
        rho = np.zeros(len(centroids))
        top = 0.0
        for _, vecs in chunks():
            w = cls.assign(centroids, vecs)
            assigned.append(w)
            v = np.asarray(vecs, dtype=np.float64)
            d = v - c64[w]
            np.maximum.at(rho, w, np.sqrt(np.einsum("ij,ij->i", d, d)))
            top = max(top, norm_bound(vecs))
        return _write_lists(path, centroids, chunks, lambda: iter(assigned), _up(rho), top)

    @classmethod
    def open(cls, path, verify: bool = True) -> "CertifiedIVF":
        """Open a saved directory with the vectors and ids memory-mapped (read-only). verify=True checks
        every file against the manifest's SHA-256 first (IntegrityError on a mismatch)."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path / 'manifest.json'}: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not a certified IVF directory")
        if verify:
            for name in _FILES:
                digest = _sha256(path / f"{name}.npy")
                if digest != manifest["sha256"][name]:
                    raise IntegrityError(f"{path / (name + '.npy')} does not match its recorded SHA-256: "
                                         "it is corrupted or was altered; rebuild it")
        centroids = np.load(path / "centroids.npy")
        rho = np.load(path / "rho.npy")
        offsets = np.load(path / "offsets.npy")
        ids = np.load(path / "ids.npy", mmap_mode="r")
        vecs = np.load(path / "vectors.npy", mmap_mode="r")
        lists = [_List(ids[a:b], vecs[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        ivf = cls(centroids, lists, rho, float(manifest["max_norm"]))
        ivf._whole = (ids, vecs)
        return ivf


_EXECUTOR_LOCK = threading.Lock()
SPLIT_MIN = 1 << 16  # items per thread below which a FAISS scan of lists is not split (`top_in_lists`)
_EXECUTOR = None


def faiss_scans(q: np.ndarray, jobs: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """`CertifiedIVF.top_in_lists` for several FAISS-backed lists at once: jobs [(ivf, lists, k, exclude, drop)],
    each ivf's `_faiss` set and its `lists` non-empty ones, `drop` refs of items to leave out (`_faiss_part`);
    (scores, refs) per job. Above 2·SPLIT_MIN items in all, the jobs' lists, one after the other, are cut into
    `_threads()` (or fewer) stretches of about equal item counts, each scanned on a thread of its own, one
    FAISS scan per job it covers; each scan returns its own top k (the contract's split case: an item left out
    of its part's answer scores at most k kept items of that part)."""
    sizes = [ivf.list_sizes()[lists] for ivf, lists, *_ in jobs]
    total = int(sum(int(x.sum()) for x in sizes))
    parts = max(1, min(_threads(), total // SPLIT_MIN))
    owner = np.concatenate([np.full(len(x), j) for j, x in enumerate(sizes)]) if jobs else np.zeros(0, int)
    where = np.concatenate([np.arange(len(x)) for x in sizes]) if jobs else np.zeros(0, int)
    ends = np.cumsum(np.concatenate(sizes)) if jobs else np.zeros(0)
    stretch = np.minimum(parts - 1, (ends - 1) * parts // max(total, 1))  # the stretch each list falls in
    tasks = []
    for p in range(parts):
        pieces = []
        for j in np.unique(owner[stretch == p]):
            ivf, lists, k, exclude, drop = jobs[j]
            mine = lists[where[(stretch == p) & (owner == j)]]
            drop = np.asarray(drop, dtype=np.int64)
            pieces.append((j, ivf, mine, k, exclude, drop[np.isin(drop >> 32, mine)] if len(drop) else drop))
        if pieces:
            tasks.append(pieces)

    def scan(pieces):
        return [(piece[0], piece[1]._faiss_part(q, *piece[2:])) for piece in pieces]

    found = [f for done in pool_map(scan, tasks) for f in done]
    out = []
    for j in range(len(jobs)):
        mine = [f for i, f in found if i == j]
        out.append((np.concatenate([s for s, _ in mine]) if mine else np.zeros(0, np.float32),
                    np.concatenate([r for _, r in mine]) if mine else np.zeros(0, np.int64)))
    return out


def _threads() -> int:
    return max(1, min(_CPUS, faiss.omp_get_max_threads()))


_CPUS = os.cpu_count() or 1


def _executor():
    """Threads for parallel FAISS scans (FAISS releases the GIL while it scans), made once (under a lock: two
    threads' first scans would otherwise each make a pool)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            from concurrent.futures import ThreadPoolExecutor

            _EXECUTOR = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="robret-ivf")
        return _EXECUTOR


def pool_map(fn, tasks) -> list:
    """[fn(t) for t in tasks], the tasks on the pool's threads (`_executor`) when there are several, in order.
    One task, or a caller that is itself one of the pool's threads (a scan nested in a scan), runs them on the
    calling thread: a pool thread waiting on tasks queued behind it could wait forever."""
    tasks = list(tasks)
    if len(tasks) <= 1 or threading.current_thread().name.startswith("robret-ivf"):
        return [fn(t) for t in tasks]
    return list(_executor().map(fn, tasks))


def _forget_executor() -> None:
    global _EXECUTOR, _EXECUTOR_LOCK
    _EXECUTOR = None  # a forked child has none of its parent's threads: waiting on them would hang
    _EXECUTOR_LOCK = threading.Lock()  # (and a lock held by one of them at the fork would stay held)


os.register_at_fork(after_in_child=_forget_executor)


def _kernel_scores(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """fl32⟨q, e_j⟩ for every row of `vectors` (n, D), by FAISS's kernel on this thread."""
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.empty(len(vecs), np.float32)
    if len(vecs):
        faiss.fvec_inner_products_ny(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(vecs), vecs.shape[1],
                                     len(vecs))
    return out


def _faiss_top(index, q: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k float32 scores over `lists` of the FAISS IVF `index` (flat codes) in one C++ call, with refs
    list << 32 | offset (FAISS's `store_pairs` labels)."""
    scores = np.empty(k, np.float32)
    labels = np.empty(k, np.int64)
    keys = np.ascontiguousarray(lists, dtype=np.int64)
    coarse = np.zeros(len(keys), np.float32)  # unused by a flat IVF on inner products
    index.search_preassigned_c(1, faiss.swig_ptr(q), k, faiss.swig_ptr(keys), faiss.swig_ptr(coarse),
                               faiss.swig_ptr(scores), faiss.swig_ptr(labels), True,
                               faiss.SearchParametersIVF(nprobe=len(keys)))
    got = labels >= 0
    return scores[got], labels[got]


def _write_lists(path, centroids: np.ndarray, chunks, where, rho: np.ndarray, max_norm: float) -> dict:
    """Write (ids, vectors) from `chunks()` placed list by list (`where()` yields each chunk's lists) into
    the new directory `path`: every file fsynced, then `manifest.json` with every file's SHA-256, written
    last and atomically (a directory without a manifest is an interrupted write)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    nlist, dim = centroids.shape
    counts = np.zeros(nlist, np.int64)
    for w in where():
        counts += np.bincount(w, minlength=nlist)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    ids_out = np.lib.format.open_memmap(path / "ids.npy", "w+", np.int64, (n,))
    vec_out = np.lib.format.open_memmap(path / "vectors.npy", "w+", np.float32, (n, dim))
    fill = offsets[:-1].copy()
    for (ids, vecs), w in zip(chunks(), where()):
        order = np.argsort(w, kind="stable")
        ws = w[order]
        present = np.unique(ws)
        lo = np.searchsorted(ws, present)
        hi = np.searchsorted(ws, present, side="right")
        for c, a, b in zip(present, lo, hi):
            rows = order[a:b]
            ids_out[fill[c]:fill[c] + len(rows)] = np.asarray(ids)[rows]
            vec_out[fill[c]:fill[c] + len(rows)] = np.asarray(vecs)[rows]
            fill[c] += len(rows)
    for arr in (ids_out, vec_out):
        arr.flush()
    del ids_out, vec_out
    for name, arr in (("centroids", centroids), ("rho", np.asarray(rho, np.float64)), ("offsets", offsets)):
        _write_npy(path / f"{name}.npy", arr)
    manifest = {"format": FORMAT, "nlist": int(nlist), "dim": int(dim), "count": n, "max_norm": float(max_norm),
                "sha256": {name: _sha256(path / f"{name}.npy", fsync=True) for name in _FILES}}
    fsync_dir(path)
    atomic_write_text(path / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr))
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, fsync: bool = False) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsync:
            os.fsync(fd)
        return fd_sha256(fd)
    finally:
        os.close(fd)
