"""The FAISS side of a gallery: unit-norm float32 vectors with stable 64-bit ids, inner product.

Index types (a small closed set: certificates need every stored vector exactly, so no PQ/SQ):
    "Flat"            IndexIDMap2(IndexFlatIP): exact; the default.
    "IVF<n>,Flat"     IndexIVFFlat (inner product) with its own 64-bit ids and a hash-table direct
                      map (reconstruct by id); search parameter `nprobe`. Needs training, so it is
                      built from a flat index once the gallery has ≥ 39·n vectors.
    "HNSW<M>"         IndexIDMap2(IndexHNSWFlat(M, inner product)); search parameter `efSearch`.
                      HNSW cannot delete, so removals rebuild it.
    "auto"            Flat up to AUTO_APPROX_MIN vectors, then IVF with n ≈ 4·√N lists.

Why no IndexIDMap2 around IVF: IndexIDMap::remove_ids compacts its id table assuming the wrapped
index renumbers its rows in order (true of IndexFlat, false of IVF), which would silently pair ids
with the wrong vectors. With IndexFlat the wrapper is exactly what prevents the classic id drift
(IndexFlat alone renumbers everything after a removed row).

Files: `write(path)` goes through encoder.io.atomic_write (temporary file, fsync, rename over `path`,
fsync of the directory), so a reader sees the old file or the new one, never a torn one; it returns
the file's SHA-256.
Searches run on the GPU when FAISS sees one (a search-only copy, rebuilt after changes), unless
`use_gpu=False`, k > GPU_MAX_K (FAISS's GPU selection limit), or the copy fails its arithmetic check
(`gpu_arithmetic_ratio`: certificates bound what an exact search left out by the float32 error of its
scores, so a GPU that scores in reduced precision, TF32 say, is not used). On the CPU a flat search of
fewer than FLAT_SCAN_MAX_QUERIES queries (and an exact HNSW search, over the graph's flat storage) is one
pass of FAISS's inner-product kernel over the stored rows per query, split over the cores above
2·SPLIT_MIN rows, then `top_rows` (`scan_top`, `VectorStore._flat_scan`).
Readers (`Gallery.open`) do not load a Flat gallery into this class: index/mapped.py maps its files (and
searches them on torch's GPU when there is one, index/gpu_scan.py); unless FAISS sees a GPU, an IVF base is read
with its lists mapped (`read(mapped=True)`, read-only), any segments after it layered on it (index/mapped_ivf.py).
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import re
import threading
from pathlib import Path

import faiss
import numpy as np

from encoder.io import atomic_write, fd_sha256, file_sha256, fsync_dir

from .errors import IntegrityError, StoreError
from .ivf import norm_bound

__all__ = ["VectorStore", "AUTO_APPROX_MIN", "NORM_TOLERANCE", "parse_factory", "target_factory",
           "default_params", "open_checked", "file_sha256", "fsync_dir"]

log = logging.getLogger(__name__)

AUTO_APPROX_MIN = 1_000_000  # "auto" stays exact (flat) below this many vectors
FLAT_SCAN_MAX_QUERIES = 20  # below this many queries a flat search is the store's own scan (`_flat_scan`)
CHUNK_ROWS = 1 << 16  # vectors per pass where a whole-gallery computation goes chunk by chunk
IVF_MIN_POINTS_PER_LIST = 39  # FAISS's k-means wants ≥ 39 training points per centroid
NORM_TOLERANCE = 1e-3  # |‖v‖ − 1| allowed for a stored vector (float32 embeddings)
_FACTORY = re.compile(r"^(?:(Flat)|IVF(\d+),Flat|HNSW(\d+)(?:,Flat)?|(auto))$")


def parse_factory(factory: str) -> tuple[str, int]:
    """'Flat' → ('flat', 0); 'IVF1024,Flat' → ('ivf', 1024); 'HNSW32' → ('hnsw', 32); 'auto' → ('auto', 0)."""
    m = _FACTORY.match(factory.strip())
    if not m:
        raise ValueError(f"unsupported index type {factory!r}: use Flat, IVF<nlist>,Flat, HNSW<M> or auto "
                         "(vectors must be stored exactly for certificates, so no PQ/SQ compression)")
    if m.group(1):
        return "flat", 0
    if m.group(2):
        n = int(m.group(2))
        if n < 1:
            raise ValueError("IVF needs at least one list")
        return "ivf", n
    if m.group(3):
        n = int(m.group(3))
        if n < 2:
            raise ValueError("HNSW needs M ≥ 2")
        return "hnsw", n
    return "auto", 0


def _canonical(kind: str, n: int) -> str:
    return {"flat": "Flat", "ivf": f"IVF{n},Flat", "hnsw": f"HNSW{n}"}[kind]


def target_factory(requested: str, current: str, ntotal: int) -> str:
    """The index type a gallery of `ntotal` vectors should have, given what was asked for.

    An IVF too large to train on the vectors at hand stays flat (exact) until it can be trained;
    "auto" switches to IVF once, at AUTO_APPROX_MIN vectors, and keeps that IVF afterwards.
    """
    kind, n = parse_factory(requested)
    if kind == "auto":
        if parse_factory(current)[0] != "flat":
            return current
        if ntotal < AUTO_APPROX_MIN:
            return "Flat"
        nlist = 2 ** round(math.log2(4 * math.sqrt(ntotal)))
        return f"IVF{nlist},Flat"
    if kind == "ivf" and ntotal < n * IVF_MIN_POINTS_PER_LIST:
        if current == _canonical(kind, n):
            return current  # already trained: adding and removing need no retraining
        return "Flat"
    return _canonical(kind, n)


def default_params(factory: str) -> dict:
    """Search parameters recorded with an index type (changed with `VectorStore.set_params`)."""
    kind, n = parse_factory(factory)
    if kind == "ivf":
        return {"nprobe": max(1, min(n, int(round(math.sqrt(n)))))}
    if kind == "hnsw":
        return {"efSearch": 128, "efConstruction": 200}
    return {}


def open_checked(path: str | os.PathLike, sha256: str | None) -> int:
    """A read-only descriptor of an index file (base or segment) whose bytes have the digest `sha256`
    (not checked when None): the caller reads what was checked through this very descriptor. StoreError
    when it cannot be opened; IntegrityError, naming repair, when the digest differs."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise StoreError(f"cannot read index file {path}: {exc.strerror or exc}") from None
    if sha256 is not None:
        try:
            digest = fd_sha256(fd)
        except BaseException:
            os.close(fd)
            raise
        if digest != sha256:
            os.close(fd)
            raise IntegrityError(
                f"index file {Path(path).name} has SHA-256 {digest[:16]}…, not the {str(sha256)[:16]}… "
                "committed with its version: it is corrupted or was altered, and nothing is answered "
                f"from it; run `robret index repair --index-dir {Path(path).parent}`")
    return fd


def map_checked(path: str | os.PathLike, sha256: str | None):
    """The bytes of an index file whose digest `open_checked` checked, mapped read-only (PROT_READ) through
    that very descriptor, which is then closed (b"" for an empty file). Numpy views of the map hold it open
    (index/mapped.py, index/segments.py)."""
    fd = open_checked(path, sha256)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
    finally:
        os.close(fd)


def _as_ids(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _select(scores: np.ndarray, take: int) -> np.ndarray:
    """Positions of the `take` largest of `scores` (finite, 1 ≤ take ≤ len), ordered by decreasing score
    and, among equal scores, increasing position; ties at the take-th score go to the lowest positions."""
    n = len(scores)
    if take < n:
        kth = scores[np.argpartition(scores, n - take)[n - take]]  # the take-th largest score
        above = np.flatnonzero(scores > kth)
        top = np.concatenate([above, np.flatnonzero(scores == kth)[:take - len(above)]])
    else:
        top = np.arange(n)
    return top[np.lexsort((top, -scores[top]))]


def top_rows(scores: np.ndarray, take: int, block: int = 64, maxima: np.ndarray | None = None) -> np.ndarray:
    """`_select(scores, take)` (the same positions in the same order), reading most scores only once.

    Split the N scores into consecutive blocks of `block` (the last may be shorter), let M_b be block
    b's maximum and T the take-th largest of the M_b. Claim: every score s ≥ s₍take₎ (the take-th largest
    score) lies in a block with M_b ≥ T, so selecting among the positions of those blocks, in increasing
    order, gives exactly `_select`'s answer, ties included.
    Proof: the take blocks with the largest maxima hold take distinct positions (their maxima) whose
    scores are ≥ T, so at least take scores are ≥ T, i.e. s₍take₎ ≥ T. A score s ≥ s₍take₎ ≥ T lies in
    some block b with M_b ≥ s ≥ T. ∎ The kept positions are a subset in increasing order containing all
    scores ≥ s₍take₎, so the take-th largest, the scores above it and the lowest positions among those
    equal to it are the same there as in the whole. With many equal maxima every block may be kept:
    still exact, only slower. Cost: one pass for the maxima, a partition of N/block of them, then
    `_select` over ≈ take·block scores instead of N (1M scores, take 74: ~9× faster than `_select`).
    maxima: the M_b when the caller already has them (`index.codes.scan_upper` computes them as it writes the
    scores); they must be exactly each block's maximum.
    """
    n = len(scores)
    full = n // block
    if full <= take:
        return _select(scores, take)
    if maxima is None:
        maxima = np.empty(full + (n % block > 0), scores.dtype)
        maxima[:full] = scores[:full * block].reshape(full, block).max(axis=1)
        if n % block:
            maxima[full] = scores[full * block:].max()
    t = np.partition(maxima, len(maxima) - take)[len(maxima) - take]
    kept = (np.flatnonzero(maxima >= t)[:, None] * block + np.arange(block)).ravel()
    kept = kept[kept < n]
    return kept[_select(scores[kept], take)]


def _as_vectors(x, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return x


def scan_top(q: np.ndarray, k: int, dim: int, blocks, row_ids: np.ndarray,
             dead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k of a few queries `q` (n, dim) over float32 rows held in `blocks`, on the calling thread:
    (scores (n, k) float32, ids (n, k) int64, rows (n, take) int64), take = min(k, live rows).

    blocks: [(float* to n_b rows of dim floats, n_b)], numbered back to back (row r of block b is row
    start_b + r); row_ids: the id of every row; dead: rows never taken (a mapped store's tombstones).
    For each query, scores = X·q over every block in place (no copy), computed by FAISS's own SIMD kernel
    (`fvec_inner_products_ny`, the inner product its flat search uses; above 2·SPLIT_MIN rows in one stretch
    of rows per core, each on a thread of `index.ivf`'s pool, scores bit for bit those of one pass: see
    `_scan_pieces`; the threads also take the 64-row block maxima),
    −∞ on dead rows (below every finite score, so never taken while live rows remain), then the exact
    selection `top_rows`. Why not
    `index.search`: for fewer than FLAT_SCAN_MAX_QUERIES queries FAISS runs one query inside an OpenMP
    region over all cores, which on 2 cores takes ≈ 2× as long as on one (docs/benchmarks.md, "One query
    against a flat gallery"), and its thread count is process-wide, so it cannot be lowered for one call
    while a server searches on other threads. Each score is the float32 inner product of the same two
    vectors, so `encoder.certify.float32_dot_error` (any summation order) bounds its error as it bounds
    FAISS's. Among equal scores the lower row comes first, and a query gets `take` hits, then ids −1 with
    score −FLT_MAX, as from FAISS.
    """
    n = len(row_ids)
    dead = np.zeros(0, np.int64) if dead is None else np.asarray(dead, np.int64)
    if len(dead) > 1 and not (dead[1:] > dead[:-1]).all():  # (a mapped store's are sorted already)
        dead = np.unique(dead)
    take = min(k, n - len(dead))
    out_scores, out_ids = no_answers(len(q), k)
    out_rows = np.empty((len(q), max(take, 0)), np.int64)
    if take <= 0:
        return out_scores, out_ids, out_rows
    scores = np.empty(n, np.float32)
    stretches = _scan_pieces(blocks, dim, n, dead)
    for i in range(len(q)):
        query = np.ascontiguousarray(q[i])
        maxima = _scan_scores(stretches, query, dim, scores)
        top = top_rows(scores, take, block=SCAN_BLOCK, maxima=maxima)
        out_scores[i, :take], out_ids[i, :take], out_rows[i] = scores[top], row_ids[top], top
    return out_scores, out_ids, out_rows


SCAN_BLOCK = 64  # rows per block maximum a scan computes for `top_rows`


def _scan_pieces(blocks, dim: int, n: int, dead: np.ndarray) -> list[tuple[int, int, list, np.ndarray]]:
    """The rows of `blocks` cut into one stretch per scanning thread (about equal row counts; a single stretch
    below 2·SPLIT_MIN rows or on one core): per stretch, (first row, end row, its pieces (first row, float* to
    the piece's rows, row count), each inside one block, and the rows of `dead` (sorted) inside it).

    Cuts fall where a row's offset inside its block is a multiple of SCAN_BLOCK. FAISS's kernel scores a few
    small dimensions in SIMD groups of rows counted from the pointer it is given, with a scalar loop for the
    remainder (scores depended on where a call starts at D = 2, 4 and 8, measured); groups of 8 or 16 divide 64, so a piece starting at such an offset is grouped as
    one call over its whole block is, and every score is bit for bit the one-pass score (a cut elsewhere
    rounds some scores differently: still within `float32_dot_error`, but no longer identical)."""
    from .ivf import SPLIT_MIN, _threads

    parts = max(1, min(_threads(), n // SPLIT_MIN, n // SCAN_BLOCK))
    starts, views, begin = [], [], 0
    for rows, count in blocks:
        starts.append(begin)
        views.append(faiss.rev_swig_ptr(rows, count * dim) if count and parts > 1 else rows)
        begin += count
    cuts = [0]
    for t in range(1, parts):
        c = t * n // parts
        for start, (_, count) in zip(starts, blocks):
            if start <= c < start + count:
                c = start + min(count, int(round((c - start) / SCAN_BLOCK)) * SCAN_BLOCK)
                break
        if cuts[-1] < c < n:
            cuts.append(c)
    cuts.append(n)
    stretches = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        pieces = []
        for start, view, (rows, count) in zip(starts, views, blocks):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                ptr = rows if parts == 1 else faiss.swig_ptr(view[(a - start) * dim:(b - start) * dim])
                pieces.append((int(a), ptr, int(b - a)))
        stretches.append((int(lo), int(hi), pieces, dead[np.searchsorted(dead, lo):np.searchsorted(dead, hi)]))
    return stretches


def _scan_scores(stretches, query: np.ndarray, dim: int, scores: np.ndarray) -> np.ndarray:
    """scores[r] = FAISS's float32 inner product of row r and `query`, −∞ on dead rows, the stretches on threads
    of their own (FAISS releases the GIL); returns the maximum of each SCAN_BLOCK consecutive scores (the last
    block may be shorter): each thread takes the blocks that lie inside its stretch, this thread the ones a cut
    splits."""
    n = len(scores)
    maxima = np.empty(-(-n // SCAN_BLOCK), np.float32)

    def run(stretch):
        lo, hi, pieces, dead = stretch
        for first, ptr, count in pieces:
            faiss.fvec_inner_products_ny(faiss.swig_ptr(scores[first:]), faiss.swig_ptr(query), ptr, dim, count)
        scores[dead] = -np.inf
        b0, b1 = -(-lo // SCAN_BLOCK), hi // SCAN_BLOCK  # the whole blocks inside [lo, hi)
        if b1 > b0:
            maxima[b0:b1] = scores[b0 * SCAN_BLOCK:b1 * SCAN_BLOCK].reshape(b1 - b0, SCAN_BLOCK).max(axis=1)
        if hi == n and n % SCAN_BLOCK and b1 * SCAN_BLOCK >= lo:  # the last, shorter block, inside
            maxima[b1] = scores[b1 * SCAN_BLOCK:].max()

    from .ivf import pool_map

    pool_map(run, stretches)
    for _, cut, _, _ in stretches[:-1]:
        if cut % SCAN_BLOCK:  # a block split between two stretches
            b = cut // SCAN_BLOCK
            maxima[b] = scores[b * SCAN_BLOCK:(b + 1) * SCAN_BLOCK].max()
    return maxima


def no_answers(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, k) float32 at −FLT_MAX, ids (n, k) int64 at −1): what every store's search answers past its
    last hit, as FAISS pads (an empty gallery included), for the caller to fill."""
    return np.full((n, k), -np.finfo(np.float32).max, np.float32), np.full((n, k), -1, np.int64)


def check_queries(queries, dim: int, k) -> tuple[np.ndarray, int]:
    """(queries as (n, dim) contiguous float32, k as int), or ValueError for k < 1 or a non-finite query."""
    q = _as_vectors(queries, dim)
    k = int(k)
    if k < 1:
        raise ValueError("k must be ≥ 1")
    if not np.isfinite(q).all():
        raise ValueError("queries must be finite (a NaN or infinite coordinate ranks nothing)")
    return q, k


GPU_MAX_K = 2048  # FAISS's GPU k-selection handles k ≤ 2048 (GPU_MAX_SELECTION_K); a larger k searches on the CPU


def gpu_arithmetic_ratio(index: faiss.Index, store: "VectorStore", probes: int = 32, k: int = 8) -> float:
    """How far `index` (a GPU copy of `store`) scores from the exact inner product, in units of the bound
    certificates assume: max over probe queries q and returned items e of

        |s(q, e) − ⟨q, e⟩| / float32_dot_error(D, ‖e‖, ‖q‖)      (⟨q, e⟩ in float64 from the stored vectors).

    An exact search that lists m items lets a certificate bound every unlisted item's exact score by the m-th
    listed one's plus 2·float32_dot_error (`retrieval.search`): true of any float32 summation order, false of
    a GPU computing in TF32 (10-bit mantissa) or another reduced precision. A ratio ≤ 1 on the probes does
    not prove the bound for every score; a ratio > 1 disproves it, and then the GPU is not used.

    Probes: `probes` stored vectors e spread over the index, used twice, searched all at once and each alone.
    (1) e plus a small deterministic perturbation, renormalised: ordinary queries. (2) e with every coordinate's 13 low mantissa bits set to
    0x0FFF, just below half of TF32's last place: rounding to TF32 (to nearest, or by truncation) shrinks every
    coordinate by ~2⁻¹² of itself, so ⟨q, e⟩ comes out low by ~2⁻¹²·‖q‖‖e‖ (q ≈ e: no cancellation), about
    4096/(D + 1) times the bound. Random probes alone can miss TF32 at embedding widths of 768 and more, since
    its errors then cancel to within the worst-case bound; (2) catches it for every D below ~4000."""
    from encoder.certify import float32_dot_error  # (no torch: encoder.certify imports numpy only)

    ids = store.ids()
    pick = ids[np.linspace(0, len(ids) - 1, min(probes, len(ids))).astype(np.int64)]
    base = store.reconstruct(pick)
    q = base.astype(np.float64)
    q += 0.01 * np.cos(np.arange(q.size, dtype=np.float64)).reshape(q.shape)
    q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)).astype(np.float32)
    edge = ((np.ascontiguousarray(base).view(np.uint32) & np.uint32(0xFFFFE000)) | np.uint32(0x0FFF)).view(np.float32)
    q = np.vstack([q, edge[np.isfinite(edge).all(axis=1)]])
    k = min(k, len(ids))
    scores, found = index.search(q, k)
    # and each probe alone: a search of one query may run another kernel (a matrix-vector product)
    alone = [index.search(q[r:r + 1], k) for r in range(len(q))]
    scores = np.vstack([scores, *(a[0] for a in alone)])
    found = np.vstack([found, *(a[1] for a in alone)])
    worst = 0.0
    for row, (s, f) in enumerate(zip(scores, found)):
        query = q[row % len(q)]
        keep = f >= 0
        e = store.reconstruct(f[keep]).astype(np.float64)
        exact = e @ query.astype(np.float64)
        bound = np.array([float32_dot_error(store.dim, float(np.linalg.norm(v)), float(np.linalg.norm(query)))
                          for v in e])
        err = np.abs(s[keep] - exact)
        with np.errstate(divide="ignore", invalid="ignore"):  # (a zero vector: bound 0, and error 0 unless broken)
            ratio = np.where(err == 0, 0.0, err / bound)
        worst = max([worst, *ratio])
    return float(worst)


class VectorStore:
    """A FAISS index of unit vectors under stable 64-bit ids (see module doc for the types)."""

    def __init__(self, index: faiss.Index, factory: str, params: dict | None = None, use_gpu: bool = True):
        self.index = index
        self.factory = factory
        self.kind, self._n = parse_factory(factory)
        self.params = {**default_params(factory), **(params or {})}
        self.use_gpu = use_gpu
        self.read_only = False  # True when its lists are mapped from a file (`read(mapped=True)`)
        self._gpu_index = None
        self._gpu_failed = False
        self._gpu_lock = threading.Lock()  # one GPU copy made at a time (a server's threads search at once)
        self._generation = 0  # bumped by every change, so that a copy made meanwhile is not kept
        self._apply_params()

    # Construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, dim: int, factory: str = "Flat", params: dict | None = None, use_gpu: bool = True) -> "VectorStore":
        """An empty index. IVF types are created untrained: use `from_vectors` (which trains) instead."""
        kind, n = parse_factory(factory)
        if kind == "auto":
            kind, factory = "flat", "Flat"
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, n, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = int({**default_params(factory), **(params or {})}["efConstruction"])
            index = faiss.IndexIDMap2(base)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, n, faiss.METRIC_INNER_PRODUCT)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return cls(index, _canonical(kind, n), params, use_gpu)

    @classmethod
    def from_vectors(cls, ids, vectors, factory: str = "Flat", params: dict | None = None,
                     use_gpu: bool = True, train_sample: int = 200_000, seed: int = 0) -> "VectorStore":
        """An index of `factory` type holding (ids, vectors); IVF is trained on (a sample of) them."""
        ids = _as_ids(ids)
        store = cls.create(int(np.asarray(vectors).shape[1]), factory, params, use_gpu)
        vectors = _as_vectors(vectors, store.dim)
        if store.kind == "ivf":
            need = store._n * IVF_MIN_POINTS_PER_LIST
            if len(vectors) < store._n:
                raise StoreError(f"IVF{store._n} needs at least {store._n} vectors to train, got {len(vectors)}")
            if len(vectors) < need:
                log.warning("training IVF%d on %d vectors (FAISS recommends ≥ %d)", store._n, len(vectors), need)
            sample = vectors
            if len(vectors) > train_sample:
                pick = np.random.default_rng(seed).choice(len(vectors), train_sample, replace=False)
                sample = vectors[np.sort(pick)]
            store.index.train(sample)
        store.add(ids, vectors)
        return store

    @classmethod
    def read(cls, path: str | os.PathLike, factory: str, params: dict | None = None,
             use_gpu: bool = True, sha256: str | None = None, mapped: bool = False) -> "VectorStore":
        """Load an index file; with `sha256`, only if its bytes have that digest (else IntegrityError).

        mapped=True (IVF only): FAISS maps the inverted lists read-only (`IO_FLAG_MMAP`: the lists stay in
        the file's pages, through the checked descriptor) instead of reading them; the store is then
        `read_only` (add, remove and write are StoreErrors: FAISS cannot change mapped lists).

        Integrity design: the whole file is hashed at every open that passes `sha256`, whatever its
        size. FAISS reads the whole file at open anyway (no lazy loading here), so the check costs
        one more sequential pass over bytes already in the page cache: proportional to what is read.
        The file is opened once; the digest is taken and the index loaded through that one
        descriptor, so what is checked is the very inode that is loaded (a file swapped in between
        cannot slip through). Index files are never rewritten in place (a new version is a new file
        renamed into place), so a match means the bytes committed with the version. Segments
        (index/segments.py) are checked the same way, each against its own recorded digest.
        """
        fd = open_checked(path, sha256)
        try:
            source = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else os.fspath(path)
            if mapped and parse_factory(factory)[0] != "ivf":
                raise ValueError(f"only IVF index files are mapped by VectorStore, not {factory}")
            try:
                index = faiss.read_index(source, faiss.IO_FLAG_MMAP if mapped else 0)
            except RuntimeError as exc:
                raise StoreError(f"cannot read index file {path}: {str(exc).splitlines()[0]}") from None
        finally:
            os.close(fd)
        if mapped and not isinstance(index, faiss.IndexIVFFlat):
            raise StoreError(f"index file {path} is not an IVF index; run `robret index repair`")
        if mapped:  # FAISS would start 32 prefetch threads per search of mapped lists: 9× slower at nprobe 16
            faiss.downcast_InvertedLists(index.invlists).prefetch_nthread = 0
        if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        store = cls(index, factory, params, use_gpu)
        store.read_only = mapped
        return store

    # Facts ----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def exact(self) -> bool:
        """True when `search` is exhaustive with the current parameters."""
        if self.kind == "flat":
            return True
        if self.kind == "ivf":
            return int(self.params.get("nprobe", 1)) >= self._n
        return False

    def ids(self) -> np.ndarray:
        """All ids, int64, in storage order (may contain duplicates only if a caller added them)."""
        if self.kind == "ivf":
            invlists = self.index.invlists
            parts = []
            for lst in range(self.index.nlist):
                size = invlists.list_size(lst)
                if size:
                    parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    # Changes --------------------------------------------------------------------------------
    def add(self, ids, vectors, stored: bool = False) -> None:
        """Add vectors (n, dim) under ids (n,). Vectors must be unit-norm within NORM_TOLERANCE (checked);
        they are stored renormalised (in float64, then rounded to float32: |‖v‖ − 1| ≤ ~1e-7), so that the
        certificates' bound on ‖e_i − e_j‖ stays 2 up to float rounding. stored=True: the vectors are ones
        this class stored before (read back from a segment file whose checksum was checked), added bit for bit
        as they are and unchecked, as a base file's vectors are read (`verify --deep` checks their norms)."""
        self._writable()
        ids = _as_ids(ids)
        vectors = _as_vectors(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        if not stored:
            norms = np.linalg.norm(vectors, axis=1)
            if np.any(np.abs(norms - 1) > NORM_TOLERANCE) or not np.all(np.isfinite(norms)):
                raise ValueError("vectors must be finite and unit-norm (inner product = cosine similarity)")
            vectors = np.ascontiguousarray(vectors / norms[:, None].astype(np.float64), dtype=np.float32)
        self.index.add_with_ids(vectors, ids)
        self._drop_gpu()

    def remove(self, ids) -> int:
        """Remove every vector under `ids`; returns how many were removed. Other ids keep their vectors."""
        self._writable()
        ids = _as_ids(ids)
        if len(ids) == 0 or self.ntotal == 0:
            return 0
        self._drop_gpu()
        if self.kind == "hnsw":
            keep_ids = self.ids()
            mask = ~np.isin(keep_ids, ids)
            removed = int((~mask).sum())
            if removed:
                keep_ids = keep_ids[mask]
                vectors = self.reconstruct(keep_ids)
                rebuilt = VectorStore.from_vectors(keep_ids, vectors, self.factory, self.params, self.use_gpu)
                self.index = rebuilt.index
                self._apply_params()
            return removed
        if self.kind == "ivf":  # the hash-table direct map only accepts an explicit id array
            removed = int(self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
        else:
            removed = int(self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        self._drop_gpu()  # (again: a copy begun after the first drop may have read the index before the removal)
        return removed

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError("a mapped gallery is read-only: open it with a writer to change it")

    def rebuild(self, factory: str) -> "VectorStore":
        """The same (id, vector) pairs in an index of another type (trained when needed)."""
        ids = self.ids()
        params = self.params if parse_factory(factory) == (self.kind, self._n) else None
        return VectorStore.from_vectors(ids, self.reconstruct(ids), factory, params, self.use_gpu)

    def set_params(self, **params) -> None:
        self.params.update(params)
        self._apply_params()

    def _apply_params(self) -> None:
        if self.kind == "ivf":
            self.index.nprobe = int(self.params["nprobe"])
        elif self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(self.params["efSearch"])
        self._drop_gpu()

    # Reads ----------------------------------------------------------------------------------
    def reconstruct(self, ids) -> np.ndarray:
        """Stored vectors (n, dim) float32 for `ids`; StoreError if an id is absent."""
        ids = _as_ids(ids)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        try:
            return self.index.reconstruct_batch(ids)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[0].rsplit(": ", 1)[-1]
            raise StoreError(f"cannot reconstruct ids: {detail}") from None

    def max_norm(self) -> float:
        """M ≥ every stored vector's ℓ2 norm (`index.ivf.norm_bound`, CHUNK_ROWS vectors at a time; 1.0 when
        empty)."""
        ids = self.ids()
        if len(ids) == 0:
            return 1.0
        return max(norm_bound(self.reconstruct(ids[at:at + CHUNK_ROWS])) for at in range(0, len(ids), CHUNK_ROWS))

    def search(self, queries, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores (n, k) float32 decreasing, ids (n, k) int64, −1 = none).

        exact=True makes an approximate index search exhaustively (IVF: every list; HNSW: its flat
        storage), as certificates require the true top of the list.
        """
        q, k = check_queries(queries, self.dim, k)
        if self.ntotal == 0:
            return no_answers(len(q), k)
        if exact and self.kind == "ivf" and not self.exact:
            return self.index.search(q, k, params=faiss.SearchParametersIVF(nprobe=self._n))
        if exact and self.kind == "hnsw":
            storage = faiss.downcast_index(faiss.downcast_index(self.index.index).storage)
            if len(q) < FLAT_SCAN_MAX_QUERIES:
                return self._flat_scan(q, k, storage)
            scores, rows = storage.search(q, k)
            id_map = faiss.vector_to_array(self.index.id_map)
            ids = np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
            return scores, ids
        index = self._search_index(k)
        if self.kind == "flat" and index is self.index and len(q) < FLAT_SCAN_MAX_QUERIES:
            return self._flat_scan(q, k, faiss.downcast_index(self.index.index))
        return index.search(q, k)

    def _flat_scan(self, q: np.ndarray, k: int, rows: faiss.IndexFlat) -> tuple[np.ndarray, np.ndarray]:
        """`scan_top` over `rows`, the IndexFlatIP inside the IndexIDMap2 (a flat index's, or an HNSW
        graph's storage), in place; ids from the IndexIDMap2's id_map."""
        n = self.ntotal
        scores, ids, _ = scan_top(q, k, self.dim, [(rows.get_xb(), n)], faiss.rev_swig_ptr(self.index.id_map.data(), n))
        return scores, ids

    def _drop_gpu(self) -> None:
        """Forget the GPU copy after a change (the next search makes a new one)."""
        self._generation += 1
        self._gpu_index = None

    def _search_index(self, k: int = 1) -> faiss.Index:
        """The index a search of depth k runs on: the GPU copy when there is a usable one, else `self.index`.
        FAISS's GPU refuses k > GPU_MAX_K and, for IVF, nprobe > GPU_MAX_K: those stay on the CPU."""
        if (not self.use_gpu or self._gpu_failed or self.kind == "hnsw" or k > GPU_MAX_K
                or (self.kind == "ivf" and int(self.params["nprobe"]) > GPU_MAX_K) or faiss.get_num_gpus() == 0):
            return self.index
        gpu = self._gpu_index
        if gpu is not None:
            return gpu
        with self._gpu_lock:
            if self._gpu_index is not None:
                return self._gpu_index
            if self._gpu_failed:
                return self.index
            generation = self._generation
            try:
                self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
                gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
                ratio = gpu_arithmetic_ratio(gpu, self) if self.ntotal else 0.0
            except Exception as exc:  # GPU build without this index type, out of memory, …
                log.warning("searching on the CPU: could not move the index to the GPU (%s)", exc)
                self._gpu_failed = True
                return self.index
            if not ratio <= 1.0:
                log.warning("searching on the CPU: the GPU's inner products are off by %.3g× the float32 error "
                            "bound certificates rely on (reduced precision, e.g. TF32?)", ratio)
                self._gpu_failed = True
                return self.index
            if generation != self._generation:  # changed while it was copied: this copy is stale
                return self.index
            self._gpu_index = gpu
            if generation != self._generation:  # (a change between the check and the line above: drop it again)
                self._gpu_index = None
                return self.index
            return gpu

    @property
    def on_gpu(self) -> bool:
        return self._search_index() is not self.index

    @property
    def gpu_index(self) -> faiss.Index | None:
        """FAISS's GPU copy of the index once a search (or `on_gpu`) made it, else None (for checks)."""
        return self._gpu_index

    # Files ----------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike, before_replace=None) -> str:
        """Atomically write the index to `path`; returns the file's SHA-256 hex digest.

        `before_replace(tmp_path)` runs after the temporary file is durable, before the rename
        (a hook for crash tests).
        """
        self._writable()
        digest = []

        def durable(tmp: Path) -> None:
            digest.append(file_sha256(tmp))
            if before_replace is not None:
                before_replace(tmp)

        atomic_write(path, lambda tmp: faiss.write_index(self.index, os.fspath(tmp)), before_replace=durable)
        return digest[0]
