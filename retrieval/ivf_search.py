"""Certified top-k on inverted lists without an exhaustive scan (DESIGN.md, "Certificates"; index/ivf.py).

Setting: an L-Lipschitz embedding, query q (float32, ‖q‖ ≈ 1), gallery items e_j partitioned into lists
with bounds U_c ≥ max_{j ∈ c} ⟨q, e_j⟩ (`CertifiedIVF.upper_bounds`, proved there). Exhaustive
certificate of a top-k T (encoder/certify.py): radius_i = max(0, min_{j ∉ T} r(i, j)),
r(i, j) = (s_i − s_j − slack)/(L·‖e_i − e_j‖), scores s exact (float64 from the float32 vectors).

Algorithm. Visit lists in decreasing U_c. After visiting a set V of lists, let
    B = max( max_{c ∉ V} U_c ,  t + γ )
where t is the largest float32 score of a visited item left out of the exactly scored list (`listed`:
the visited items whose float32 score exceeds max_{c ∉ V} U_c − γ, at most `cap` of them) and
γ = float32_dot_error(D, M, ‖q‖) bounds a float32 score's error. (Lists are scanned by
`CertifiedIVF.top_in_lists`, in C++ for a FAISS IVF's lists; each scan keeps only its cap + 1 best items,
and t also bounds every item a scan left out: `_Pool`.) Every item not listed, visited or not,
has exact score ≤ B. `certify_ranked(listed, unlisted_max=B, query=q)` then gives, for the listed top-k,
    radius_i = max(0, min( min_{j listed, ∉ T} r(i, j),  u_i(B) )),
u_i(B) = `encoder.certify.unlisted_radius`, a lower bound (proved there) on r(i, j) for every j with
s_j ≤ B and ‖e_j‖ ≤ M — about (s_i − B − slack)/(L·√((s_i − B)² + (b_i + √(1 − B²))²)) for unit vectors,
b_i e_i's distance from the query's axis, and never below the plain (s_i − B − slack)/(L·(‖e_i‖ + M)).

Equal to the exhaustive certificate (proof of the stopping rule). Stop when
  (a) s_k − B > ARITHMETIC_SLACK: every unlisted item scores below the k-th listed one, so the listed
      top-k T is the exact top-k ("exact with proof", up to float64 ties); and
  (b) the tail bound does not bind: u_i(B) ≥ min_{j listed ∉ T} r(i, j) for all i.
By (a) the outsiders of T are the listed ones plus every unlisted item; by (b) and the bound above,
no unlisted j has r(i, j) below the listed minimum, so radius_i is the exhaustive radius_i exactly.
Otherwise the next lists are those whose U_c exceeds what (b) needs for every i, B_needed: a B with
u_i(B) ≥ min_{j listed ∉ T} r(i, j) for every i (`encoder.certify.unlisted_threshold`; and < s_k),
visited in chunks that double; lists with U_c ≤ B_needed are never needed. A probe budget (lists) ends
the loop early: the certificate is then still sound, possibly smaller, and says so (`exhaustive` False).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from encoder.certify import ARITHMETIC_SLACK, TopKCertificate, certify_ranked, float32_dot_error, unlisted_threshold

__all__ = ["IVFCertificate", "certified_ivf_search", "DEFAULT_FIRST_PROBES", "DEFAULT_CAP", "DEFAULT_CAP_MAX"]

DEFAULT_FIRST_PROBES = 8  # lists in the first chunk (then 2×, 4×, … as needed)
DEFAULT_CAP = 512  # visited items scored exactly per round (doubled when this cap is what binds)
DEFAULT_CAP_MAX = 4096  # … up to this many: then the certificate is sound but may not be the exhaustive one
FULL_SCAN = 0.125  # a chunk of this fraction of the lists scans all the rest at once (a contiguous store: whole)


@dataclass
class IVFCertificate:
    ids: np.ndarray  # (k,) the top-k ids, by decreasing exact score
    cert: TopKCertificate  # radii at the embedding (encoder-input units before any scaling)
    vectors: np.ndarray  # (k, D) float64 top-k vectors
    listed_ids: np.ndarray  # ids scored exactly, by decreasing exact score (the top-k first)
    bound: float  # B: every item not listed scores at most this (−inf: every item was listed)
    exact_topk: bool  # proved: no item outside the top-k scores above s_k (up to ARITHMETIC_SLACK ties)
    exhaustive: bool  # proved: the radii equal the exhaustive certificate's
    budget_hit: bool  # stopped at the probe budget
    lists_visited: int
    vectors_scanned: int
    rounds: int
    capped: bool = False  # stopped because the exactly scored list reached `cap_max` items


def certified_ivf_search(ivf, query, k: int, lipschitz: float, *, slack: float, probe_budget: int | None = None,
                         first_probes: int = DEFAULT_FIRST_PROBES, cap: int = DEFAULT_CAP,
                         cap_max: int | None = DEFAULT_CAP_MAX, exclude=(), radii: bool = True) -> IVFCertificate | None:
    """Certified top-k of `query` (D,) float32 over `ivf` (index.ivf.CertifiedIVF); see the module doc.

    slack: the encoder's margin slack (`encoder.certify.slack_for`). probe_budget: at most this many lists
    visited (None: no limit). cap_max: the exactly scored list grows (doubling from cap) to at most
    max(cap_max, cap, 2k + 1) items (None: no limit; no limit either for radii=False, whose list only grows
    past cap_max for items tied within float error of the k-th). With neither limit the result is always the
    exhaustive certificate; a limit reached ends the search with a sound certificate that may be smaller
    (`budget_hit`, `capped`). Why cap_max: where the tail bound keeps binding until B is far below s_k (with
    the plain bound (s_i − B − slack)/(L·(‖e_i‖ + M)), any query that is a gallery item did), most of the gallery
    would be listed — every item scored in float64 with its pair terms, ~10 s at 1M vectors — while the flat path
    stops at its candidate list. exclude: ids left out
    of the answer and of its certificate. None when the gallery (minus `exclude`) is empty.
    radii=False: plain top-k search that stops as soon as the top-k is proved exact (condition (a) only);
    its radii are then meaningless and `exhaustive` means "top-k exact with proof".
    """
    q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
    q64 = q.astype(np.float64)
    upper = ivf.upper_bounds(q)
    order = np.argsort(-upper, kind="stable")
    sizes = ivf.list_sizes()
    nonempty = int(np.isfinite(upper).sum())
    budget = nonempty if probe_budget is None else max(1, min(nonempty, int(probe_budget)))
    gamma = float32_dot_error(len(q), ivf.max_norm, float(np.linalg.norm(q64)) * (1 + 1e-9))
    dropped = np.asarray(sorted({int(i) for i in exclude}), dtype=np.int64)
    cap = max(int(cap), 2 * k + 1)
    limit = None if cap_max is None or not radii else max(int(cap_max), cap)  # (module doc: cap_max)
    pool = _Pool(ivf, q, dropped)
    pos, step, chunk, rounds = 0, max(1, int(first_probes)), max(1, int(first_probes)), 0
    needed_lists = chunk  # lists that may still change the certificate (all unvisited ones until known)
    while True:
        rounds += 1
        if budget == nonempty and nonempty - pos > 1 and needed_lists >= FULL_SCAN * nonempty:
            # Many lists are still needed (the doubling chunk reached FULL_SCAN of them): every remaining list in
            # one scan costs less than more rounds, and the certificate is the same (every item is then visited).
            # A contiguous store is scanned whole, in one product.
            if ivf.contiguous() is not None:
                pool, pos = _Pool(ivf, q, dropped), 0
            pool.scan(order[pos:nonempty], cap)
            pos = nonempty
        else:
            pool.scan(order[pos:min(budget, pos + chunk)], cap)
            pos = min(budget, pos + chunk)
        rest = float(upper[order[pos]]) if pos < nonempty else -np.inf  # bound on every unvisited list
        if pool.size == 0:
            if pos >= budget:
                return None
            step *= 2
            chunk = needed_lists = step
            continue
        cert, bound, cap_binds, top_vecs, listed_ids = _certify_pool(
            pool, q64, k, lipschitz, slack, ivf.max_norm, rest, gamma, cap)
        # Proved exact: nothing unvisited or unlisted can exceed the k-th score, and there are k scores (fewer
        # visited items than k prove nothing while unvisited lists remain).
        exact_topk = bool(bound == -np.inf or (len(cert.scores) >= k and cert.scores[-1] - bound > ARITHMETIC_SLACK))
        done = exact_topk and (not radii or not cert.tail_binds)
        capped = not done and cap_binds and limit is not None and cap >= limit
        if done or capped or (pos >= budget and not cap_binds):
            return IVFCertificate(listed_ids[:len(cert.scores)], cert, top_vecs, listed_ids, float(bound),
                                  exact_topk, done, not done and not capped, pos, int(sizes[order[:pos]].sum()),
                                  rounds, capped)
        if cap_binds:  # the exactly scored list was too short, not the unvisited lists: lengthen it
            cap = 2 * cap if limit is None else min(2 * cap, limit)
            pool = _Pool(ivf, q, dropped)  # the visited lists again, each scan now keeping cap + 1
            pool.scan(order[:pos], cap)
            chunk = needed_lists = 0
            continue
        # Lists whose bound is at most what every radius needs can never change the certificate (module doc).
        needed = unlisted_threshold(cert.scores, top_vecs, q64, cert.listed_radius, ivf.max_norm, lipschitz, slack)
        needed = min(needed, float(cert.scores[-1]) - 2 * ARITHMETIC_SLACK)
        useful = int(np.sum(upper[order[pos:budget]] > needed))
        step *= 2
        chunk = max(1, min(step, useful))
        needed_lists = chunk  # (`useful` itself overstates what is needed while radii are still loose)


class _Pool:
    """What the visited lists left for certification: float32 scores and refs of their best items.

    Each scan of lists (`CertifiedIVF.top_in_lists` with k = cap + 1) keeps its cap + 1 best items; an item
    it leaves out scores at most cap + 1 kept ones (that method's contract). Invariant, kept by rescanning
    every visited list whenever cap grows: every scan kept cap + 1 for the current cap. Hence, when at most
    cap items are listed (`_certify_pool`), every visited item that is neither kept nor excluded scores at
    most some kept, unlisted item — at most t, the largest unlisted score (the module doc's t)."""

    def __init__(self, ivf, q, dropped):
        self.ivf, self.q, self.dropped = ivf, q, dropped
        self.scores: list[np.ndarray] = []
        self.refs: list[np.ndarray] = []
        self.size = 0  # items kept

    def scan(self, lists, cap: int) -> None:
        if len(lists):
            scores, refs = self.ivf.top_in_lists(self.q, lists, cap + 1, self.dropped)
            self.scores.append(scores)
            self.refs.append(refs)
            self.size += len(scores)


def _certify_pool(pool: _Pool, q64, k, lipschitz, slack, max_norm, rest, gamma, cap):
    """Score exactly the kept items whose float32 score exceeds rest − γ (at least k, at most `cap`;
    the module doc's `listed`) and certify them against B = max(rest, t + γ).

    Every visited item not listed scores at most t in float32: a kept one by t's definition, one a scan left
    out by `_Pool`'s invariant (when a scan left items out it kept cap + 1 > m, so m < kept and t is finite)."""
    from index.store import top_rows

    s32 = np.concatenate(pool.scores)
    refs = np.concatenate(pool.refs)
    over = int(np.sum(s32 > rest - gamma))
    m = min(pool.size, max(min(over, cap), k))
    if m < len(s32):
        top = top_rows(s32, m + 1)  # the m + 1 largest, decreasing
        rows, threshold = top[:m], float(s32[top[m]])  # the largest float32 score left out
    else:
        rows, threshold = np.arange(len(s32)), -np.inf
    bound = max(rest, threshold + gamma)
    cap_binds = m == cap and threshold + gamma >= rest
    ids, vecs = pool.ivf.items(refs[rows])
    s = np.einsum("ij,j->i", vecs, q64)  # (not BLAS, whose threads would spin beside the list scans)
    order = np.argsort(-s, kind="stable")
    s, vecs, ids = s[order], vecs[order], ids[order]
    kk = min(k, len(s))
    complete = bound == -np.inf
    cert = certify_ranked(s, vecs, kk, lipschitz, complete=complete, slack=slack, max_norm=max_norm,
                          unlisted_max=None if complete else bound, query=q64)
    if kk < k and not complete:
        # Fewer than k items scored while some are unseen: the true top-k holds an unseen item, so neither the
        # set nor any member's place in it is known. Nothing is certified (radius 0 is always sound); the tail
        # "binds", so the search visits more lists unless its budget is spent.
        zero = np.zeros(kk)
        cert = dataclasses.replace(cert, radius=zero, set_radius=0.0, order_radius=0.0, tail_radius=zero,
                                   listed_radius=np.full(kk, np.inf))
    return cert, bound, cap_binds, vecs[:kk], ids
