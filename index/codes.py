"""Int8 codes of a gallery's vectors with a proved per-vector bound: a certified scan that reads a quarter of
the bytes of an exact one (issue 15).

An exact certified query reads every float32 vector once (4·D bytes each); on two cores that scan is bound
by memory bandwidth (~22 ms at 1M vectors, D = 129). `QuantizedCodes` keeps one byte a coordinate and two
floats a vector, and its scan gives, for every vector, an *upper bound* on the exact score, never an
estimate; `retrieval.quantized_search` scores exactly only the vectors whose bound can still matter.

Codes. For a stored float32 vector e (D coordinates) let a = fl32(max_i |e_i| / 127) (a float32 scale; 0
for a zero vector), w_i = clip(rint(e_i / a), −127, 127) (int8; 0 where a = 0) and ê = a·w. Its residual
bound δ ≥ ‖e − ê‖ is computed in float64 from the float32 e, a and w (a·w_i is exact in float64: 24 × 8
bits; each difference, square, sum term and the square root round once, a relative error below
(D + 4)·2⁻⁵² on δ in the worst case), inflated by ρ_D = 1e-12 + (D + 4)·2⁻⁵² relative and stored as the
float32 at or above it. Soundness does not depend on how w was rounded, only on δ: a worse w only loosens
the bound.

Scan. For a float32 query q let ν be a float32 ≥ ‖q‖ (`query_norm_up`). The kernel computes for every vector,
in float32,
    ū = fl( fl(a·fl(S)) + fl(ν·δ) ),   S = Σ_i q_i·w_i,
summing S in any order, with or without fused multiply-adds (numba, fastmath limited to reassociation and
contraction; w_i converts to float32 exactly).

Range (`covers`). Every intermediate is bounded: |partial sums of S| ≤ P := Σ_i |q_i w_i| ≤ 127·√D·ν,
a·P ≤ √D·ν·M, ν·δ ≤ ν·M. When 127·√D·ν·max(1, M, a_max) < 2¹²⁰ nothing overflows (FLT_MAX ≈ 2¹²⁸), and
`retrieval.quantized_search` refuses queries outside that range (the exact scan answers them).

Claim. Within that range, for every vector, s = ⟨q, e⟩ ≤ ū + E with
    E = γ_{D+3}·ν·(M + 2·δ_max) + 2·(D + 1)·2⁻⁵³·ν·M + 127·(3D + 4)·max(1, a_max)·max(1, ν)·2⁻¹²⁶,
γ_n = n·u/(1 − n·u), u = 2⁻²⁴, M ≥ every vector's norm, δ_max and a_max the largest δ and scale (`error`;
`encoder.certify.float32_dot_error(D + 2, …)` is the first term), and s the float64 score certificates use.
Proof. The real inner product satisfies ⟨q, e⟩ = ⟨q, ê⟩ + ⟨q, e − ê⟩ ≤ a·S + ‖q‖·δ ≤ a·S + ν·δ =: v
(Cauchy–Schwarz). Now a·P ≤ ‖q‖·‖a·w‖ = ‖q‖·‖ê‖ ≤ ν·(‖e‖ + δ) ≤ ν·(M + δ_max). Without underflow (Higham,
Accuracy and Stability, §3.1, any summation order; a fused operation rounds once where two would round twice):
    |fl(S) − S| ≤ γ_{D+1}·P,
    T = fl(a·fl(S)):  |T − a·S| ≤ a·γ_{D+1}·P + u·a·(1 + γ_{D+1})·P ≤ γ_{D+2}·a·P,
    R = fl(ν·δ):      |R − ν·δ| ≤ u·ν·δ,  and  |ū − (T + R)| ≤ u·(|T| + |R|),
so v − ū ≤ γ_{D+2}·a·P + u·ν·δ + u·((1 + γ_{D+2})·a·P + (1 + u)·ν·δ) ≤ γ_{D+3}·a·P + γ_3·ν·δ
≤ γ_{D+3}·(a·P + ν·δ) ≤ γ_{D+3}·ν·(M + 2·δ_max). Underflow, gradual or flushed to zero (FTZ/DAZ, which some
libraries set process-wide): inside S each of at most 2D − 1 products and sums, and each q_i read as zero
under DAZ, moves S by less than 127·2⁻¹²⁶, which T scales by a; a scale a or residual δ read as zero moves T or R
by less than 127·√D·ν·2⁻¹²⁶ or ν·2⁻¹²⁶; T, R and ū themselves by less than 2⁻¹²⁶ each — in all less than
(127·2D·a_max + 127·√D·ν + ν + 3)·2⁻¹²⁶, below the last term of E. The float64 score s differs from the real ⟨q, e⟩ by at most γ^{(64)}_{D+1}·Σ|q_i e_i| ≤ 2·(D + 1)·2⁻⁵³·ν·M
(the second term; ν ≥ ‖q‖ holds under DAZ too, as `query_norm_up` adds √D·2⁻¹²⁶). Hence s ≤ v + … ≤ ū + E. ∎
E is ~1e-5 for unit vectors; δ is ~0.01 in 129 dimensions (a·√(D/12) for uniform rounding errors), the
bound's real looseness.

Built one part a file of the store (`from_store`; index/row_parts.py: the base, then each segment that adds
rows), CHUNK_ROWS rows at a time, each part padded to a multiple of BLOCK rows, and held in memory (D + 16
bytes a row: 145 MB at 1M). Rows a later tombstone removed (dead) and padding rows have δ = −∞ and id −1, and
their ū is −∞: ν > 0 (`query_norm_up` adds √D·2⁻¹²⁶), so fl(ν·δ) = −∞; a·fl(S) is finite in the range
`covers` admits; and −∞ plus a finite number, fused or not, is −∞ (the kernel's fastmath flags assume nothing
about infinities). A live row's ū is finite. So `retrieval.quantized_search` never lists a dead row while a
live one is unlisted; the claim above is about the live rows. Codes are valid for the store they were built
from; a `Gallery` keeps the version it opened, so codes built from its store stay valid for it. A newer version
takes the older version's parts of the files both hold as they are (`from_store`'s `reuse`; why that is what
coding them again gives: index/row_parts.py, "Sharing"), with a new array of residual bounds only where a new
tombstone kills rows of a shared file, and codes only the other files.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from encoder.certify import float32_dot_error

from .row_parts import Layout

__all__ = ["CodedPart", "QuantizedCodes", "scan_upper"]

QMAX = 127
RANGE = 2.0 ** 120  # 127·√D·ν·max(1, M, a_max) below this: no float32 overflow in the scan (module doc)
BLOCK = 64  # rows per block maximum the scan also returns (`index.store.top_rows`' default block)


class CodedPart(NamedTuple):
    """One part's rows (index/row_parts.py), padded to a multiple of BLOCK: int8 codes (P, D), scales (P,) and
    residual bounds (P,), −∞ at dead and padding rows (module doc); `norm` ≥ the norm of every row alive when the
    part was coded (`index.ivf.norm_bound`)."""
    codes: np.ndarray
    scale: np.ndarray
    resid: np.ndarray
    norm: float


class QuantizedCodes:
    """Int8 codes, scales and residual bounds of a gallery's vectors, one `CodedPart` a part of its store, with one
    id a row (−1 for dead and padding rows; module doc).

    Rows are numbered over the parts as `scan` returns them, padding included.
    `layout` is the store's (`index.row_parts.Layout`: rows without padding) and `by_file` whether its parts are
    its files (what a newer version may share)."""

    def __init__(self, parts: list[CodedPart], layout: Layout, dim: int, by_file: bool = False):
        self.parts, self.layout, self.dim, self.by_file = list(parts), layout, int(dim), by_file
        ids = []
        for p, part in enumerate(self.parts):
            at, end = layout.starts[p], layout.starts[p + 1]
            if part.codes.shape != (-(-(end - at) // BLOCK) * BLOCK, self.dim):
                raise ValueError(f"part {p} of shape {part.codes.shape} for {end - at} rows of dimension {self.dim} "
                                 f"padded to {BLOCK}")
            row_ids = np.full(len(part.codes), -1, np.int64)
            row_ids[:end - at] = layout.ids[at:end]
            row_ids[layout.dead_in(at, end - at) - at] = -1
            ids.append(row_ids)
        if len(self.parts) != len(layout.starts) - 1:
            raise ValueError(f"{len(self.parts)} coded parts for {len(layout.starts) - 1} parts")
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)  # one a row, −1 where dead or padding
        self.alive = layout.n - len(layout.dead_rows)
        self.max_norm = max((part.norm for part in self.parts), default=0.0)  # M ≥ every live row's norm
        self.resid_max = max((_finite_max(part.resid) for part in self.parts), default=0.0)
        self.scale_max = max((float(part.scale.max()) for part in self.parts if len(part.scale)), default=0.0)
        self.reused = 0  # rows of parts taken from an older version's codes (`from_store`'s reuse)
        self.shared_bytes = 0  # bytes of the arrays taken from it, which both versions hold once

    def __len__(self) -> int:
        """The live rows coded."""
        return self.alive

    @property
    def nbytes(self) -> int:
        """Bytes of every array these codes use (those shared with another version's codes included)."""
        return self.ids.nbytes + sum(p.codes.nbytes + p.scale.nbytes + p.resid.nbytes for p in self.parts)

    def live_rows(self) -> np.ndarray:
        """The rows (as `scan` numbers them) of the live vectors, in order."""
        return np.flatnonzero(self.ids >= 0)

    def live(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, codes, scales, residual bounds) of the live rows, in order: copies, for checks."""
        rows = self.live_rows()
        whole = [np.concatenate([getattr(p, name) for p in self.parts]) for name in ("codes", "scale", "resid")]
        return (self.ids[rows], *(a[rows] for a in whole))

    @classmethod
    def from_vectors(cls, ids, vectors) -> "QuantizedCodes":
        """Codes of float32 rows (n, D) with their ids, as one part."""
        vectors = np.asarray(vectors, np.float32)
        ids = np.asarray(ids, np.int64)
        return cls([_code_part(vectors, np.zeros(0, np.int64), vectors.shape[1], len(vectors) or 1)],
                   Layout([len(vectors)], ids, []), vectors.shape[1])

    @classmethod
    def from_store(cls, store, chunk: int | None = None, stop=None, reuse: "QuantizedCodes | None" = None,
                   rows: int = 0) -> "QuantizedCodes | None":
        """Codes of every row of `store`, one part a file (`index.row_parts.row_parts`), `chunk` rows at a time;
        None when `stop` (a threading.Event) is set between chunks.

        reuse, rows: the codes of an older version of the gallery, and how many leading stored rows both versions
        hold in the files they share (`Gallery.prepare_search`, `index.layout.common_files`, `file_starts`). Every part
        of reuse that may stand for the store's (`Layout.shares`: same bounds within those rows, same ids, its dead
        rows among the store's; and its first and last rows coded alike) is taken as it is, not coded (`reused`
        counts its rows), with its norm bound; where the store has more dead rows in it, a copy of its residual
        bounds is made with −∞ at them. Why that is what coding it again gives: index/row_parts.py, "Sharing"."""
        from .row_parts import row_parts
        from .store import CHUNK_ROWS

        chunk = chunk or CHUNK_ROWS
        parts, row_ids, dead, by_file = row_parts(store)
        layout = Layout([len(part) for part in parts], row_ids, dead)
        older = reuse if by_file and reuse is not None and reuse.by_file and reuse.dim == store.dim else None
        coded, reused, shared = [], 0, 0
        for p, part in enumerate(parts):
            at, size = layout.starts[p], len(part)
            got = _shared_part(older, layout, p, part, rows) if older is not None else None
            if got is None:
                got = _code_part(part, layout.dead_in(at, size) - at, store.dim, chunk, stop)
                if got is None:
                    return None
            else:
                reused += size
                shared += sum(a.nbytes for a, b in zip(got[:3], older.parts[p][:3]) if a is b)
            coded.append(got)
        built = cls(coded, layout, store.dim, by_file)
        built.reused, built.shared_bytes = reused, shared
        return built

    def scan(self, query) -> tuple[np.ndarray, np.ndarray]:
        """(ū (rows,) float32, block maxima) for a float32 query (D,): ⟨q, e_j⟩ ≤ ū_j + `error` for every live
        row, −∞ at dead and padding rows (module doc); the maxima of each BLOCK consecutive ū, for
        `index.store.top_rows(ū, m, maxima=…)`."""
        q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query of dimension {q.shape[0]} for codes of dimension {self.dim}")
        return scan_upper([(p.codes, p.scale, p.resid) for p in self.parts], q, query_norm_up(q))

    def covers(self, query, max_norm: float | None = None) -> bool:
        """True when the scan of `query` stays in float32's range (module doc, "Range"): the bound is proved only
        then; otherwise search the float32 vectors (`retrieval.search` does)."""
        q = np.asarray(query, np.float32).reshape(-1)
        if not np.isfinite(q).all():
            return False
        big = max(1.0, self.max_norm if max_norm is None else float(max_norm), self.max_norm, self.scale_max)
        return QMAX * math.sqrt(self.dim) * float(query_norm_up(q)) * big < RANGE

    def error(self, query, max_norm: float | None = None) -> float:
        """E of the module doc for this query and M = max_norm (≥ every vector's norm; default the codes' own)."""
        m = self.max_norm if max_norm is None else max(float(max_norm), self.max_norm)
        q = np.asarray(query, np.float32).reshape(-1)
        nu = float(query_norm_up(q))
        d = self.dim
        underflow = QMAX * (3 * d + 4) * max(1.0, self.scale_max) * max(1.0, nu) * 2.0 ** -126
        return (float32_dot_error(d + 2, m + 2 * self.resid_max, nu) + 2 * (d + 1) * 2.0 ** -53 * nu * m + underflow)


def _finite_max(a: np.ndarray) -> float:
    """The largest value of `a` above −∞ (0.0 if none)."""
    top = float(a.max()) if len(a) else 0.0
    return max(top, 0.0)


def _code_part(part, dead: np.ndarray, dim: int, chunk: int, stop=None) -> CodedPart | None:
    """A `CodedPart` of `part`'s rows (`len` and row slicing giving float32 (n, dim)), coded `chunk` rows at a
    time; `dead`: its rows (0-based) a tombstone removed. None when `stop` is set between chunks."""
    from .ivf import norm_bound

    size = len(part)
    padded = -(-size // BLOCK) * BLOCK
    codes = np.zeros((padded, dim), np.int8)
    scale = np.zeros(padded, np.float32)
    resid = np.full(padded, -np.inf, np.float32)
    alive = np.ones(size, bool)
    alive[dead] = False
    norm = 0.0
    for at in range(0, size, chunk):
        if stop is not None and stop.is_set():
            return None
        vectors = np.asarray(part[at:at + chunk], np.float32)
        if vectors.shape != (min(chunk, size - at), dim):
            raise ValueError(f"rows of shape {vectors.shape} at {at} of {size} rows of dimension {dim}")
        end = at + len(vectors)
        codes[at:end], scale[at:end], resid[at:end] = quantize(vectors)
        live = alive[at:end]
        norm = max(norm, norm_bound(vectors if live.all() else vectors[live]))
    resid[dead] = -np.inf
    return CodedPart(codes, scale, resid, norm)


def _shared_part(older: QuantizedCodes, layout: Layout, p: int, part, rows: int) -> CodedPart | None:
    """older's part p as this store's part p (`QuantizedCodes.from_store`'s reuse), or None."""
    if not layout.shares(older.layout, p, rows):
        return None
    at, size = layout.starts[p], len(part)
    mine = older.parts[p]
    for r in ({0, size - 1} if size else ()):
        codes, scale, _ = quantize(np.asarray(part[r:r + 1], np.float32))
        if not (np.array_equal(codes[0], mine.codes[r]) and scale[0] == mine.scale[r]):
            return None
    dead = layout.dead_in(at, size) - at
    if np.isneginf(mine.resid[dead]).all():
        return mine
    resid = mine.resid.copy()
    resid[dead] = -np.inf
    return mine._replace(resid=resid)


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (n, D) int8, scale (n,) float32, resid (n,) float32) of float32 rows (module doc)."""
    e = np.asarray(vectors, np.float32)
    if e.ndim != 2:
        raise ValueError(f"expected (n, D) vectors, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("vectors must be finite")
    from ._codes_kernel import quantize as kernel

    e = np.ascontiguousarray(e)
    codes = np.empty(e.shape, np.int8)
    scale = np.empty(len(e), np.float32)
    delta = np.empty(len(e), np.float64)
    kernel(e, codes, scale, delta)  # float64: each a·w_i exact, one rounding per difference, square and sum
    delta *= 1 + round_up(e.shape[1])
    resid = delta.astype(np.float32)
    low = resid.astype(np.float64) < delta
    resid[low] = np.nextafter(resid[low], np.float32(np.inf))
    return codes, scale, resid


def round_up(dim: int) -> float:
    """ρ_D: relative inflation covering float64 rounding in a norm of `dim` terms (module doc)."""
    return 1e-12 + (dim + 4) * 2.0 ** -52


def query_norm_up(q: np.ndarray) -> np.float32:
    """A float32 ν ≥ ‖q‖ (float64 norm, inflated, plus √D·2⁻¹²⁶ for subnormal coordinates a DAZ mode reads as
    zero; rounded up)."""
    norm = math.sqrt(float(np.dot(q.astype(np.float64), q.astype(np.float64)))) * (1 + round_up(len(q)))
    norm += math.sqrt(len(q)) * 2.0 ** -126
    nu = np.float32(norm)
    return nu if float(nu) >= norm else np.nextafter(nu, np.float32(np.inf))


def scan_upper(parts, q: np.ndarray, nu, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(ū for every row of `parts` (module doc), the maximum of each `block` consecutive ū: `index.store.top_rows`'s
    first pass, done while the scores are written). parts: (codes, scales, residual bounds) in row order, each a
    multiple of `block` rows but the last. The rows are cut at multiples of `block` into stretches of about an even
    share per scanning thread (`index.ivf`'s pool; the kernel releases the GIL), none across two parts: the same
    ū as one thread gives, bit for bit, unless a flush-to-zero mode is set in some threads and not others
    (`torch.set_flush_denormal` sets the calling thread's), which moves ū by less than 2⁻¹²⁶ — within E either
    way (module doc)."""
    from ._codes_kernel import upper as kernel
    from .ivf import SPLIT_MIN, _threads, pool_map

    parts = [part for part in parts if len(part[0])]
    n = sum(len(part[0]) for part in parts)
    out = np.empty(n, np.float32)
    maxima = np.empty(-(-n // block), np.float32)
    nu = np.float32(nu)
    threads = max(1, min(_threads(), n // SPLIT_MIN, n // block))
    step = max(1, -(-n // threads // block)) * block
    tasks, at = [[]], 0  # each task: stretches of consecutive rows (several small parts in one), ~step rows
    for p, (codes, scale, resid) in enumerate(parts):
        size = len(codes)
        if size % block and p < len(parts) - 1:
            raise ValueError(f"a part of {size} rows before the last: parts are padded to multiples of {block}")
        for lo in range(0, size, step):
            if sum(len(piece[0]) for piece in tasks[-1]) >= step:
                tasks.append([])
            tasks[-1].append((codes[lo:lo + step], scale[lo:lo + step], resid[lo:lo + step], at + lo))
        at += size

    def run(task):
        for codes, scale, resid, lo in task:
            kernel(codes, scale, resid, q, nu, out[lo:lo + len(codes)], maxima[lo // block:], block)

    pool_map(run, [task for task in tasks if task])
    return out, maxima
