"""Retrieval metrics: Recall@k, mAP, percentile rank, overlap@k, certified Recall@k, and robrank's ERS.

Conventions: `sim` is a (Q, N) score matrix ⟨e(q), e(g)⟩ (higher = closer); `query_labels` (Q,) and
`gallery_labels` (N,) are integer classes; `self_index` (Q,) is the query's own gallery position
(leave-one-out protocol of CUB/CARS/SOP, where every image is a query against all the others) or −1.
Percentages are in [0, 100].
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from encoder.certify import certify_topk

__all__ = [
    "ERS_KEYS", "ers_normalize", "ers", "recall_at_k", "mean_average_precision", "percentile_rank",
    "overlap_at_k", "certified_radii", "certified_recall_at_k",
]

# robrank's ten scores, in its order (tools/pjswipe.py: cap, cam, qap, qam, tma, esd, esr, ltm, gtm, gtt).
ERS_KEYS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")


def ers_normalize(scores: Mapping[str, float]) -> dict[str, float]:
    """Map robrank's raw scores to "higher is more robust, ~[0, 100]" (Zhou et al. 2106.03614; robrank).

        CA+ → 2·CA+        CA− → 100 − CA−      QA+ → 2·QA+       QA− → 100 − QA−
        TMA → 100·(1 − TMA)                     ES:D → 100·(2 − ES:D)/2
        ES:R, LTM, GTM, GTT → unchanged
    Inputs: CA±, QA± percentile ranks in %; TMA a cosine similarity; ES:D an embedding shift in
    [0, 2]; ES:R, LTM, GTM Recall@1 in %; GTT retain@4 in %. As in robrank, nothing is clipped (a
    prank above 50% maps above 100).
    """
    missing = [k for k in ERS_KEYS if k not in scores]
    if missing:
        raise ValueError(f"ERS needs all ten scores; missing {missing}")
    s = {k: float(scores[k]) for k in ERS_KEYS}
    return {
        "CA+": 2.0 * s["CA+"],
        "CA-": 100.0 - s["CA-"],
        "QA+": 2.0 * s["QA+"],
        "QA-": 100.0 - s["QA-"],
        "TMA": 100.0 * (1.0 - s["TMA"]),
        "ES:D": 100.0 * (2.0 - s["ES:D"]) / 2.0,
        "ES:R": s["ES:R"],
        "LTM": s["LTM"],
        "GTM": s["GTM"],
        "GTT": s["GTT"],
    }


def ers(scores: Mapping[str, float]) -> float:
    """Empirical Robustness Score: the mean of the ten normalised scores (`ers_normalize`)."""
    return float(np.mean(list(ers_normalize(scores).values())))


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _masked_sim(sim, self_index) -> np.ndarray:
    s = _np(sim).astype(np.float64, copy=True)
    if self_index is not None:
        si = _np(self_index).astype(np.int64).reshape(-1)
        rows = np.nonzero(si >= 0)[0]
        s[rows, si[rows]] = -np.inf
    return s


def _relevance(sim, query_labels, gallery_labels, self_index):
    s = _masked_sim(sim, self_index)
    order = np.argsort(-s, axis=1, kind="stable")
    ql = _np(query_labels).reshape(-1, 1)
    gl = _np(gallery_labels).reshape(-1)
    rel = gl[order] == ql
    if self_index is not None:
        si = _np(self_index).astype(np.int64).reshape(-1, 1)
        rel &= order != si  # the query itself is never a match
    return rel


def recall_at_k(sim, query_labels, gallery_labels, ks: Iterable[int] = (1,), self_index=None) -> dict[int, float]:
    """Recall@k (%): share of queries with at least one item of their class among the top k."""
    rel = _relevance(sim, query_labels, gallery_labels, self_index)
    return {int(k): 100.0 * float(rel[:, :k].any(1).mean()) for k in ks}


def mean_average_precision(sim, query_labels, gallery_labels, self_index=None) -> float:
    """mAP (%) over the full ranking; queries without any match in the gallery are skipped."""
    rel = _relevance(sim, query_labels, gallery_labels, self_index)
    hits = rel.cumsum(1)
    n_rel = rel.sum(1)
    ranks = np.arange(1, rel.shape[1] + 1)
    ap = (rel * hits / ranks).sum(1) / np.maximum(n_rel, 1)
    valid = n_rel > 0
    return 100.0 * float(ap[valid].mean()) if valid.any() else float("nan")


def percentile_rank(sim, targets, self_index=None) -> np.ndarray:
    """prank (%) per query: mean over its targets (Q, M) of #{items closer than the target} / N.

    robrank's measure of the query attacks (0: at the top, ~50: a random item, 100: at the bottom).
    """
    s = _masked_sim(sim, self_index)
    t = _np(targets).astype(np.int64)
    t = t.reshape(t.shape[0], -1)
    st = np.take_along_axis(s, t, axis=1)  # (Q, M)
    closer = (s[:, None, :] > st[:, :, None]).sum(2)
    return 100.0 * closer.mean(1) / s.shape[1]


def overlap_at_k(before_topk, after_topk) -> np.ndarray:
    """Per query |top-k before ∩ top-k after| / k, from two (Q, k) index arrays."""
    a, b = _np(before_topk), _np(after_topk)
    return (a[:, :, None] == b[:, None, :]).any(2).mean(1)


def certified_radii(query_emb, gallery_emb, query_labels, gallery_labels, lipschitz: float, k: int = 1,
                    self_index=None) -> np.ndarray:
    """Per query the ℓ2 radius within which a correct item provably stays in the top-k (0 if none is).

    Uses encoder.certify.certify_topk (exact bisector radii, pruned); `lipschitz` must bound the map
    from the perturbed image to the embedding (e.g. L·‖resize‖₂, see ImageEmbedder.image_lipschitz).
    """
    q, g = _np(query_emb).astype(np.float64), _np(gallery_emb).astype(np.float64)
    ql, gl = _np(query_labels).reshape(-1), _np(gallery_labels).reshape(-1)
    si = None if self_index is None else _np(self_index).astype(np.int64).reshape(-1)
    out = np.zeros(q.shape[0])
    for i in range(q.shape[0]):
        idx = np.arange(g.shape[0])
        if si is not None and si[i] >= 0:
            idx = np.delete(idx, si[i])
        cert = certify_topk(q[i], g[idx], min(k, idx.size - 1), lipschitz)
        correct = gl[idx[cert.positions]] == ql[i]
        if correct.any():
            out[i] = float(cert.radius[correct].max())
    return out


def certified_recall_at_k(query_emb, gallery_emb, query_labels, gallery_labels, lipschitz: float | None,
                          eps: Sequence[float], k: int = 1, self_index=None) -> dict[float, float]:
    """Certified Recall@k (%) at each ε: a query counts when a correct item of its clean top-k is
    certified to stay in the top-k for every ‖δ‖₂ ≤ ε (radius > ε). k = 1: its correct top-1 is certified.

    Returns {} when the encoder has no Lipschitz bound (nothing is certified).
    """
    if lipschitz is None:
        return {}
    radii = certified_radii(query_emb, gallery_emb, query_labels, gallery_labels, lipschitz, k, self_index)
    return {float(e): 100.0 * float((radii > e).mean()) for e in eps}
