"""Certified top-k from a scan of int8 codes: the exhaustive certificate, with exact scores only where they
can matter (issue 15; index/codes.py).

Setting as in `retrieval.ivf_search`: an L-Lipschitz embedding, float32 query q, gallery vectors e_j with
‖e_j‖ ≤ M, exhaustive certificate radius_i = max(0, min_{j ∉ T} r(i, j)), r(i, j) = (s_i − s_j − slack)/(L·‖e_i − e_j‖),
scores s exact (float64 from the float32 vectors). `QuantizedCodes.scan` gives ū_j with
s_j ≤ ū_j + E for every j (proved in index/codes.py): each vector is its own "list" with bound ū_j + E.

Algorithm. List the m vectors with the largest ū (ties: lowest row first, `index.store.top_rows`), score them
exactly, and bound every other vector by B = ū_(m+1) + E (the largest unlisted ū; −∞ when all are listed).
`certify_ranked(listed, unlisted_max=B, query=q)` then gives a sound certificate (the bound on unlisted items
is `encoder.certify.unlisted_radius`, as for certified IVF). It equals the exhaustive certificate when
  (a) s_k − B > ARITHMETIC_SLACK (the listed top-k is the exact top-k), and
  (b) the tail bound does not bind (no unlisted item can come closer than a listed one),
by the argument in `retrieval.ivf_search`'s module doc. Otherwise m grows: to every vector whose ū exceeds
B_needed − E (`encoder.certify.unlisted_threshold`, what every radius needs; then B ≤ B_needed), and at least
doubles. A longer list only adds exact competitors, so radii shrink and B_needed rises: the next round
usually ends it. At `cap_max` listed items the search stops with a sound certificate that may be smaller
(`capped`), as certified IVF does.

`exclude`: ids left out of the answer and of its certificate; they are dropped from the listed items, and B
still bounds every unlisted item.
"""
from __future__ import annotations

import numpy as np

from encoder.certify import ARITHMETIC_SLACK, certify_ranked, unlisted_threshold
from index.codes import BLOCK

from .ivf_search import DEFAULT_CAP_MAX, IVFCertificate

__all__ = ["certified_quantized_search", "FIRST_LIST"]

FIRST_LIST = 64  # vectors listed in the first round beyond k (the flat path's `default_candidates`: k + 64)


def certified_quantized_search(codes, vectors, query, k: int, lipschitz: float, *, slack: float, max_norm: float,
                               exclude=(), first: int | None = None,
                               cap_max: int | None = DEFAULT_CAP_MAX) -> IVFCertificate | None:
    """Certified top-k of `query` (D,) over `codes` (index.codes.QuantizedCodes); see the module doc.

    vectors: ids → float32 vectors (n, D) (the gallery's stored vectors, `Gallery.vectors`). max_norm: M ≥
    every vector's norm. first: vectors listed in the first round (default max(2k, k + FIRST_LIST)).
    cap_max: at most this many listed (None: no limit; then the result is always the exhaustive certificate).
    None when the gallery (minus `exclude`) is empty. The result is an `IVFCertificate` whose
    `lists_visited` is 0 and `vectors_scanned` the number of codes scanned.
    """
    from index.store import top_rows

    q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
    if not np.isfinite(q).all():
        raise ValueError("queries must be finite (a NaN or infinite coordinate ranks nothing)")
    if not codes.covers(q, max_norm):
        raise ValueError("the query is outside the range where the int8 codes' bound is proved (float32 overflow); "
                         "search the float32 vectors")
    q64 = q.astype(np.float64)
    n = len(codes)  # (live rows: a dead or padding row's ū is −∞, below every live one's, and its id −1)
    dropped = np.asarray(sorted({int(i) for i in exclude}), dtype=np.int64)
    if n == 0 or n <= len(dropped) and np.isin(codes.ids[codes.live_rows()], dropped).all():
        return None
    upper, maxima = codes.scan(q)
    err = codes.error(q, max_norm)
    m = min(n, max(2 * k, k + FIRST_LIST if first is None else int(first)) + len(dropped))
    limit = None if cap_max is None else max(int(cap_max), 2 * k + 1) + len(dropped)
    rounds = 0
    while True:
        rounds += 1
        if m < n:
            top = top_rows(upper, m + 1, block=BLOCK, maxima=maxima)
            rows, bound = top[:m], float(upper[top[m]]) + err
        else:
            rows, bound = codes.live_rows(), -np.inf
        ids = codes.ids[rows]
        if len(dropped):
            ids = ids[~np.isin(ids, dropped)]
        vecs = np.asarray(vectors(ids), np.float64)
        s = vecs @ q64
        order = np.argsort(-s, kind="stable")
        s, vecs, ids = s[order], vecs[order], ids[order]
        complete = m >= n
        kk = min(k, len(s))
        if complete and kk == 0:  # every stored item excluded (an id stored twice can pass the first check)
            return None
        enough = kk == k or complete
        if enough and kk:
            cert = certify_ranked(s, vecs, kk, lipschitz, complete=complete, slack=slack, max_norm=max_norm,
                                  unlisted_max=None if complete else bound, query=q64)
            exact_topk = bool(complete or s[kk - 1] - bound > ARITHMETIC_SLACK)
            done = exact_topk and not cert.tail_binds
            capped = not done and limit is not None and m >= limit
            if done or capped or m >= n:
                return IVFCertificate(ids[:kk], cert, vecs[:kk], ids, float(bound), exact_topk, done, False, 0, n,
                                      rounds, capped)
        if enough and kk and exact_topk:
            needed = unlisted_threshold(cert.scores, vecs[:kk], q64, cert.listed_radius, max_norm, lipschitz, slack)
            needed = min(needed, float(s[kk - 1]) - 2 * ARITHMETIC_SLACK)
            want = int(np.count_nonzero(upper > needed - err)) + len(dropped)
        else:  # fewer than k listed, or the top-k not yet proved: list more
            want = 2 * m
        m = min(n, max(want, 2 * m))
        if limit is not None:
            m = min(m, limit)
