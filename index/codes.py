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

Built from a store's live vectors (`from_store`, CHUNK_ROWS at a time), held in memory (D + 16 bytes a
vector: 145 MB at 1M), and valid for the store it was built from; a `Gallery` keeps the version it
opened, so codes built from its store stay valid for it. A newer version takes the older version's codes of
the rows both hold in the files they share (`from_store`'s `reuse`; why those rows are the same:
`index.layout.common_files`) and codes only the others.
"""
from __future__ import annotations

import math

import numpy as np

from encoder.certify import float32_dot_error

__all__ = ["QuantizedCodes", "scan_upper"]

QMAX = 127
RANGE = 2.0 ** 120  # 127·√D·ν·max(1, M, a_max) below this: no float32 overflow in the scan (module doc)
BLOCK = 64  # rows per block maximum the scan also returns (`index.store.top_rows`' default block)


class QuantizedCodes:
    """Int8 codes, scales and residual bounds of a gallery's vectors, with their ids (module doc)."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, scale: np.ndarray, resid: np.ndarray, max_norm: float):
        self.max_norm = float(max_norm)  # M ≥ every coded vector's norm (`index.ivf.norm_bound` of the vectors)
        self.ids = np.ascontiguousarray(ids, np.int64)
        self.codes = np.ascontiguousarray(codes, np.int8)
        self.scale = np.ascontiguousarray(scale, np.float32)
        self.resid = np.ascontiguousarray(resid, np.float32)
        self.resid_max = float(self.resid.max()) if len(self.resid) else 0.0
        self.scale_max = float(self.scale.max()) if len(self.scale) else 0.0
        self.reused = 0  # leading rows copied from an older version's codes (`from_store`'s reuse)
        self.leading: list[int] | None = None  # alive rows before each file of the live set coded (`Gallery.quantize`)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.codes.nbytes + self.scale.nbytes + self.resid.nbytes

    @classmethod
    def from_vectors(cls, ids, vectors) -> "QuantizedCodes":
        from .ivf import norm_bound

        vectors = np.asarray(vectors, np.float32)
        return cls(np.asarray(ids, np.int64), *quantize(vectors), norm_bound(vectors))

    @classmethod
    def from_store(cls, store, chunk: int | None = None, stop=None, reuse: "QuantizedCodes | None" = None,
                   old_rows: int = 0, new_rows: int = 0) -> "QuantizedCodes | None":
        """Codes of every live vector of `store` (its `ids()` and `reconstruct`), `chunk` rows at a time;
        None when `stop` (a threading.Event) is set between chunks.

        reuse, old_rows, new_rows: the codes of an older version of the gallery, how many of their leading rows
        and how many of the store's leading rows lie in the files both versions share (`Gallery.quantize`,
        `index.layout.common_files`). When the store's first new_rows ids are the older codes' first old_rows
        ids, in the same order, some removed, their codes are copied, not recomputed (`reused` counts them),
        and only the other rows are read and coded. A code depends on its vector's bytes alone, and those rows'
        vectors are the same (common_files' claim), so the copies are what coding them again gives. M becomes
        max(the older codes' M, the new rows' bound): the older M bounds every row it coded."""
        from .ivf import norm_bound
        from .store import CHUNK_ROWS

        chunk = chunk or CHUNK_ROWS
        ids = np.asarray(store.ids(), np.int64)
        codes = np.empty((len(ids), store.dim), np.int8)
        scale = np.empty(len(ids), np.float32)
        resid = np.empty(len(ids), np.float32)
        top, start = 0.0, 0
        pick = _kept_rows(reuse, ids, old_rows, new_rows) if reuse is not None and reuse.dim == store.dim else None
        if pick is not None:
            start = int(new_rows)
            codes[:start], scale[:start], resid[:start] = reuse.codes[pick], reuse.scale[pick], reuse.resid[pick]
            top = reuse.max_norm
        for at in range(start, len(ids), chunk):
            if stop is not None and stop.is_set():
                return None
            part = slice(at, at + chunk)
            vectors = store.reconstruct(ids[part])
            codes[part], scale[part], resid[part] = quantize(vectors)
            top = max(top, norm_bound(vectors))
        built = cls(ids, codes, scale, resid, top)
        built.reused = start
        return built

    def scan(self, query) -> tuple[np.ndarray, np.ndarray]:
        """(ū (n,) float32, block maxima) for a float32 query (D,): ⟨q, e_j⟩ ≤ ū_j + `error` for every vector
        (module doc); the maxima of each BLOCK consecutive ū, for `index.store.top_rows(ū, m, maxima=…)`."""
        q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query of dimension {q.shape[0]} for codes of dimension {self.dim}")
        return scan_upper(self.codes, self.scale, self.resid, q, query_norm_up(q))

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


def _kept_rows(old: QuantizedCodes, ids: np.ndarray, old_rows: int, new_rows: int):
    """Rows of `old` whose codes the first new_rows of `ids` take (a slice or an index array), or None: they
    must be old's first old_rows ids in the same order with some removed."""
    old_rows, new_rows = int(old_rows), int(new_rows)
    if not 0 < new_rows <= old_rows <= len(old) or new_rows > len(ids):
        return None
    head, old_head = ids[:new_rows], old.ids[:old_rows]
    if new_rows == old_rows:
        return slice(0, new_rows) if np.array_equal(head, old_head) else None
    from ._codes_kernel import subsequence

    keep = np.empty(new_rows, np.int64)  # (one pass; np.isin sorts: seconds at 10M)
    return keep if subsequence(old_head, head, keep) == new_rows else None


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


def scan_upper(codes: np.ndarray, scale: np.ndarray, resid: np.ndarray, q: np.ndarray, nu,
               block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(ū for every row (module doc), the maximum of each `block` consecutive ū: `index.store.top_rows`'s first
    pass, done while the scores are written), the rows cut at multiples of `block` into one stretch per scanning
    thread (`index.ivf`'s pool; the kernel releases the GIL)."""
    from ._codes_kernel import upper as kernel
    from .ivf import SPLIT_MIN, _threads, pool_map

    n = len(codes)
    out = np.empty(n, np.float32)
    maxima = np.empty(-(-n // block), np.float32)
    nu = np.float32(nu)
    parts = max(1, min(_threads(), n // SPLIT_MIN, n // block))
    if parts == 1:
        kernel(codes, scale, resid, q, nu, out, maxima, block)
        return out, maxima
    cuts = np.unique(np.linspace(0, n // block, parts + 1).astype(np.int64) * block)
    cuts[-1] = n

    def run(lo_hi):
        lo, hi = lo_hi
        kernel(codes[lo:hi], scale[lo:hi], resid[lo:hi], q, nu, out[lo:hi], maxima[lo // block:], block)

    pool_map(run, zip(cuts[:-1], cuts[1:]))
    return out, maxima
