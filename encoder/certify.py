"""Certified radii for 2AFC decisions and top-k retrieval (DESIGN.md, "Certificates").

Threat model: the query image x is perturbed by δ with ‖δ‖₂ ≤ ε; e is L-Lipschitz and unit-norm.
All radii are in the encoder's input space; divide by the preprocessing norm
(`TorchEncoder.input_norm`) to state them for the user's image.

2AFC (Ghazanfari et al. 2024): the decision is sign(d(x,x1) − d(x,x0)) = sign⟨e(x), e0 − e1⟩,
which moves by at most L·‖δ‖·‖e0 − e1‖, so it cannot flip while
    ‖δ‖ < R = |⟨e(x), e0 − e1⟩| / (L·‖e0 − e1‖).

Retrieval: with scores s_i = ⟨e(q), e_i⟩, item i stays above item j while
    ‖δ‖ < r(i, j) = (s_i − s_j) / (L·‖e_i − e_j‖)
(the distance of e(q) to the bisecting hyperplane, over L). An item i of the top-k stays in the
top-k while no outsider overtakes it: radius_i = min_{j ∉ top-k} r(i, j); the top-k set is
certified at min_i radius_i. With M ≥ ‖e_j‖ for every stored vector (M = 1 for exactly unit vectors;
stored float32 vectors are within ~1e-7 of it, and callers pass the gallery's measured maximum),
‖e_i − e_j‖ ≤ ‖e_i‖ + M, so r(i, j) ≥ (s_i − s_j)/(L·(‖e_i‖ + M)): scanning outsiders by decreasing
score, the scan stops once that lower bound exceeds every current radius_i, and every item beyond the
retrieved list (score ≤ s_last + `unlisted_slack`) is covered by (s_i − s_last − unlisted_slack)/(L·(‖e_i‖ + M)).
Given the query, both bounds use where an item scoring at most B can lie (`unlisted_radius`): the same
margin over L·√(x₀² + Y₀²), which for nearby items is about half of L·(‖e_i‖ + M) or less.

Ceiling (what no training can lift). With ‖e(q)‖ = 1, Cauchy–Schwarz gives
s_i − s_j = ⟨e(q), e_i − e_j⟩ ≤ ‖e_i − e_j‖, so every r(i, j) ≤ 1/L, and likewise R ≤ 1/L for 2AFC:
an L-Lipschitz unit-norm encoder certifies no top-k radius and no 2AFC radius of 1/L or more in its
input space (equality only for e_j = −e_i = −e(q)). Beyond ‖δ‖ = 2/L the Lipschitz bound allows e(x')
anywhere on the sphere. (Radii stated for the user's image are larger by the preprocessing's reduction,
`TorchEncoder.input_norm`.)

Float error (`slack`). The ranking is computed from float32 embeddings ê = e + err, ‖err‖ ≤ ε (the
encoder's measured float error, `TorchEncoder.float_error`). For the perturbed query x' and
d = ê_i − ê_j (fixed stored vectors):
    ⟨ê(x'), d⟩ ≥ ⟨e(x'), d⟩ − ε‖d‖ ≥ ⟨e(x), d⟩ − L‖δ‖‖d‖ − ε‖d‖ ≥ ⟨ê(x), d⟩ − (L‖δ‖ + 2ε)‖d‖,
so i stays above j while ‖δ‖ < (⟨ê(x), d⟩ − 2ε‖d‖)/(L‖d‖). Subtracting slack = 2ε·(2M) ≥ 2ε‖d‖
from every margin (`slack_for`) makes every radius below sound for the computed ranking.
`DEFAULT_SLACK` is only a fallback for callers that know nothing about their encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_SLACK",
    "slack_for",
    "float32_dot_error",
    "TopKCertificate",
    "twoafc_radius",
    "pair_radius",
    "unlisted_radius",
    "unlisted_threshold",
    "certify_ranked",
    "certify_topk",
    "certify_topk_bruteforce",
]

DEFAULT_SLACK = 1e-5
ARITHMETIC_SLACK = 1e-9  # float64 score arithmetic on float32 vectors (errors ~1e-15), with room


def slack_for(float_error: float | None, max_norm: float = 1.0) -> float:
    """Margin slack sound for an encoder whose float32 embeddings are within `float_error` of exact:

        slack = 2·ε·‖e_i − e_j‖ ≤ 2·ε·2M  (module docstring), plus float64 arithmetic.

    None (unknown error) gives DEFAULT_SLACK.
    """
    if float_error is None:
        return DEFAULT_SLACK
    return 4.0 * float(float_error) * float(max_norm) + ARITHMETIC_SLACK


def float32_dot_error(dim: int, max_norm: float = 1.0, query_norm: float = 1.0) -> float:
    """Bound on |fl32(⟨q, e⟩) − ⟨q, e⟩| for a float32 inner product of length `dim` in any summation order:

        γ_n·Σ|q_i e_i| ≤ γ_n·‖q‖‖e‖,  γ_n = n·u/(1 − n·u), u = 2⁻²⁴  (Higham, Accuracy and Stability, §3.1),

    with n = dim + 1 for the products. An index searched in float32 may rank an item outside its list
    above the list's last item by at most twice this.
    """
    n = dim + 1
    u = 2.0 ** -24
    return n * u / (1 - n * u) * max_norm * query_norm


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def twoafc_radius(e_ref, e0, e1, lipschitz: float, slack: float = DEFAULT_SLACK) -> np.ndarray:
    """R = max(0, |⟨e_ref, e0 − e1⟩| − slack) / (L·‖e0 − e1‖) per row; 0 for a tie (e0 = e1).

    Inputs: unit-norm embeddings, shape (B, D) (or (D,)); returns shape (B,) (or a scalar array).
    """
    e_ref, e0, e1 = _f64(e_ref), _f64(e0), _f64(e1)
    diff = e0 - e1
    margin = np.maximum(np.abs((e_ref * diff).sum(-1)) - slack, 0.0)
    norm = np.linalg.norm(diff, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > 0, margin / (lipschitz * np.where(norm > 0, norm, 1.0)), 0.0)


def pair_radius(query, e_i, e_j, lipschitz: float, slack: float = 0.0) -> np.ndarray:
    """Signed r(i, j) = (⟨q, e_i − e_j⟩ − slack) / (L·‖e_i − e_j‖); negative when j already ranks above i.

    Broadcasts over leading dimensions; 0 where e_i = e_j.
    """
    q, e_i, e_j = _f64(query), _f64(e_i), _f64(e_j)
    diff = e_i - e_j
    norm = np.linalg.norm(diff, axis=-1)
    margin = (q * diff).sum(-1) - slack
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > 0, margin / (lipschitz * np.where(norm > 0, norm, 1.0)), 0.0)


AXIS_ALLOWANCE = 1e-6  # added to Y₀ in `unlisted_radius`: covers float64 rounding under its square roots


def unlisted_radius(scores, vectors, query, bound: float, max_norm: float, lipschitz: float,
                    slack: float = 0.0) -> np.ndarray:
    """Lower bound on r(i, j) over every item j that scores at most B and has norm at most M:

        r(i, j) ≥ (s_i − B − c) / (L·√(x₀² + Y₀²)),  x₀ = (s_i − B)/ν,  Y₀ = b_i + √(M² − (B/ν)²),

    for ⟨q, e_j⟩ ≤ B, ‖e_j‖ ≤ M, with s_i = ⟨q, e_i⟩ (`scores`, (k,)), e_i (`vectors`, (k, D)), ν = ‖q‖ > 0,
    b_i = ‖e_i − ⟨q̂, e_i⟩q̂‖ (e_i's distance from the query's axis, q̂ = q/ν), c = slack ≥ 0, and B first
    clamped to [−νM, νM] (every item scores inside it, so the set of items bounded is unchanged).
    Returns, per i, the larger of that and the plain bound (s_i − B − c)/(L·(‖e_i‖ + M)); where
    s_i − B − c ≤ 0 both are ≤ 0 (no radius; callers clamp at 0). M is first raised to at least every ‖e_i‖
    (the proof needs ‖e_i‖ ≤ M) and then by 1e-12 (below), so both are evaluated with that M.

    Proof (s_i − B > c). Write d = e_i − e_j = x·q̂ + d⊥ (d⊥ ⊥ q̂), a = ⟨q̂, e_i⟩, y = ‖d⊥‖, B̂ = B/ν.
    Then x = a − ⟨q̂, e_j⟩ ≥ a − B̂ = x₀ > 0, and y ≤ ‖e_i⊥‖ + ‖e_j⊥‖ = b_i + √(‖e_j‖² − (a − x)²) ≤ Y(x),
    Y(x) = b_i + √(M² − (a − x)²) on [a − M, a + M], which holds x₀ (|B̂| ≤ M), every feasible x
    (|⟨q̂, e_j⟩| ≤ M) and 0 (|a| ≤ ‖e_i‖ ≤ M). Y is concave with Y(0) ≥ 0, so for x ≥ x₀ > 0, writing
    x₀ = (x₀/x)·x + (1 − x₀/x)·0: Y(x₀) ≥ (x₀/x)·Y(x), i.e. y/x ≤ Y₀/x₀. Hence ‖d‖ = √(x² + y²) ≤
    x·√(1 + Y₀²/x₀²), and r(i, j) = (νx − c)/(L‖d‖) ≥ (ν − c/x)/(L·√(1 + Y₀²/x₀²)), increasing in x, so
    ≥ (ν − c/x₀)/(L·√(1 + Y₀²/x₀²)) = (s_i − B − c)/(L·√(x₀² + Y₀²)).  ∎
    Tight for c = 0: e_j = B̂·q̂ − √(M² − B̂²)·u, u = e_i⊥/b_i, attains it. Non-increasing in B (for c = 0
    it is the minimum over a set that grows with B; (s_i − B − c)/(s_i − B) also falls).
    Float64 rounding: M is raised by a relative and an absolute 1e-12, so that it bounds the exact norm of
    e_i too (whose float64 norm is right only to ~(D + 2)·2⁻⁵³ relative), which only shrinks the bound. ν and
    b_i carry relative errors ≲ (D + 2)·2⁻⁵³ (~2e-13 at D = 2048), so B̂² is off by ≲ 2(D + 2)·2⁻⁵³·M², which
    the raise of M (it adds ≥ 2·1e-12·M² under the root) covers for D up to ~9,000; beyond, the square root's
    error (≤ the root of what is left) and b_i's are covered by adding `AXIS_ALLOWANCE` to Y₀ (a larger Y₀
    only shrinks the bound, by at most AXIS_ALLOWANCE/√(x₀² + Y₀²) relative). The margin s_i − B is computed
    as the plain bound's (so both agree on its sign); the score arithmetic is covered by the slack, as for
    every radius.
    """
    return _unlisted(*_axis_terms(scores, vectors, query), bound, max_norm, lipschitz, slack)


def unlisted_threshold(scores, vectors, query, radius, max_norm: float, lipschitz: float, slack: float = 0.0,
                       rounds: int = 4) -> float:
    """A bound B below which no item can lower any radius_i: unlisted_radius(B) ≥ radius_i for every i
    (arguments as `unlisted_radius`, radius (k,)). −inf when some radius_i is +inf (no listed outsider).
    A search may leave unscored every item scoring at most the returned B without changing any radius:
    such an item j has r(i, j) ≥ unlisted_radius(B)_i ≥ radius_i.

    Search: from the plain bound's exact threshold min_i s_i − c − L·(‖e_i‖ + M)·radius_i (which satisfies
    the condition, unlisted_radius being ≥ the plain bound) up to min_i s_i + 1 (which does not), `rounds`
    grids of 31 points each shrink the bracket 32-fold; the returned B is a grid point that was checked.
    unlisted_radius is non-increasing in B, so the bracket holds the largest such B (within 32⁻ʳᵒᵘⁿᵈˢ of it).
    """
    s, norms, b, nu = _axis_terms(scores, vectors, query)
    target = np.maximum(_f64(radius).reshape(-1), 0.0)
    if not np.all(np.isfinite(target)):
        return -np.inf
    plain = s - slack - lipschitz * (norms + _raised(max_norm, norms)) * target  # the plain bound reaches radius_i there
    lo, hi = float(plain.min()), float(s.min()) + 1.0
    for _ in range(rounds):
        grid = np.linspace(lo, hi, 33)[1:-1]
        ok = np.all(_unlisted(s, norms, b, nu, grid[:, None], max_norm, lipschitz, slack) >= target, axis=1)
        fail = int(np.argmin(ok)) if not ok.all() else len(grid)  # every grid point before `fail` satisfies
        lo, hi = (grid[fail - 1] if fail else lo), (grid[fail] if fail < len(grid) else hi)
    return float(lo)


def _raised(max_norm: float, norms: np.ndarray) -> float:
    """M for `unlisted_radius`: at least every ‖e_i‖ given, then raised by 1e-12 relative and absolute (its
    docstring: float64 rounding)."""
    top = max(float(max_norm), float(norms.max()) if len(norms) else 0.0)
    return top * (1 + 1e-12) + 1e-12


def _axis_terms(scores, vectors, query):
    """(s, ‖e_i‖, b_i, ν) of `unlisted_radius`, float64."""
    s = _f64(scores).reshape(-1)
    e = _f64(vectors).reshape(len(s), -1)
    q = _f64(query).reshape(-1)
    nu = float(np.linalg.norm(q))
    b = np.linalg.norm(e - np.outer(e @ q, q) / (nu * nu), axis=1) if nu > 0 else np.zeros(len(s))
    return s, np.linalg.norm(e, axis=1), b, nu


def _unlisted(s, norms, b, nu, bound, max_norm, lipschitz, slack):
    """`unlisted_radius` from `_axis_terms`; `bound` a float or an array broadcasting against s."""
    bound = np.asarray(bound, dtype=np.float64)
    max_norm = _raised(max_norm, norms)
    plain = (s - bound - slack) / (lipschitz * (norms + max_norm))
    if nu == 0.0 or not np.all(np.isfinite(bound)):
        return plain
    clamped = np.clip(bound, -nu * max_norm, nu * max_norm)  # (the same items score below it)
    m = s - clamped  # exactly the plain bound's margin where B needs no clamping: m > slack iff s_i − B > slack
    bh = clamped / nu
    x0 = m / nu
    y0 = b + np.sqrt(np.maximum(max_norm * max_norm - bh * bh, 0.0)) + AXIS_ALLOWANCE
    with np.errstate(divide="ignore", invalid="ignore"):
        tight = np.where(m > slack, (m - slack) / (lipschitz * np.sqrt(x0 * x0 + y0 * y0)), -np.inf)
    return np.maximum(plain, tight)


@dataclass
class TopKCertificate:
    """Certificate of one query's top-k (radii in encoder-input ℓ2 units; see module doc)."""

    positions: np.ndarray  # (k,) positions of the top-k in the ranked list given (0..k−1 when ranked)
    scores: np.ndarray  # (k,) scores s_i, decreasing
    radius: np.ndarray  # (k,) radius_i: item i stays in the top-k for ‖δ‖ < radius_i
    set_radius: float  # the top-k set cannot change for ‖δ‖ < set_radius
    order_radius: float  # the ordered top-k list cannot change for ‖δ‖ < order_radius
    pairs_evaluated: int  # exact pairs computed (all pairs would be k·(n − k))
    # (k,) min over listed outsiders j of r(i, j) (inf: none listed), before the unlisted bound and the clamp at 0
    listed_radius: np.ndarray | None = None
    # (k,) the bound every unlisted item gives (`certify_ranked`: plain, or `unlisted_radius`); None when complete
    tail_radius: np.ndarray | None = None

    @property
    def tail_binds(self) -> bool:
        """True when the bound on unlisted items lowered some radius below its listed pairs' minimum.

        False means every radius_i is max(0, min over *listed* outsiders of r(i, j)): no unlisted item can
        lower it, so it is what an exhaustive pair scan over the same top-k would give.
        """
        if self.tail_radius is None or self.listed_radius is None:
            return False
        return bool(np.any(self.tail_radius < self.listed_radius))

    def scaled(self, factor: float) -> "TopKCertificate":
        """The same certificate with radii divided by `factor` (e.g. the preprocessing norm)."""
        return TopKCertificate(
            self.positions, self.scores, self.radius / factor, self.set_radius / factor,
            self.order_radius / factor, self.pairs_evaluated,
            None if self.listed_radius is None else self.listed_radius / factor,
            None if self.tail_radius is None else self.tail_radius / factor,
        )


def certify_ranked(
    ranked_scores,
    ranked_embeddings,
    k: int,
    lipschitz: float,
    complete: bool,
    slack: float = DEFAULT_SLACK,
    block: int = 32,
    max_norm: float | None = None,
    unlisted_slack: float = 0.0,
    unlisted_max: float | None = None,
    query=None,
) -> TopKCertificate:
    """Certify the top-k of one query from its ranked list, with pruning.

    ranked_scores: (n,) scores s = ⟨e(q), e_j⟩ sorted decreasingly (as returned by the index).
    ranked_embeddings: (n, D) (unit-norm) embeddings in the same order.
    complete: True when the list holds the whole gallery; otherwise unlisted items (scores at most
    s_last + unlisted_slack) are bounded by (s_i − s_last − unlisted_slack − slack)/(L·(‖e_i‖ + M)).
    unlisted_max: an upper bound on every unlisted item's exact score, given by the caller instead of
    s_last + unlisted_slack (e.g. the certified IVF search's bound on lists it has not visited).
    max_norm: M, an upper bound on every gallery vector's norm. Default: the largest listed norm when the
    list is complete; otherwise also at least 1 + 1e-6, the bound for vectors stored renormalised
    (index/store.py) — callers that know their gallery's maximum (retrieval.search) pass it.
    query: q (D,), whose scores these are. Given, the pruning and the unlisted items' bound use
    `unlisted_radius` (where an item scoring at most B can lie) instead of (s_i − B − slack)/(L·(‖e_i‖ + M)).
    """
    s = _f64(ranked_scores)
    n = s.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the list length {n}")
    if np.any(np.diff(s) > 1e-6):
        raise ValueError("ranked_scores must be sorted in decreasing order")
    emb = _f64(ranked_embeddings)
    norms = np.linalg.norm(emb, axis=1)
    listed_max = float(norms.max())
    if max_norm is None:
        max_norm = listed_max if complete else max(listed_max, 1.0 + 1e-6)
    max_norm = max(float(max_norm), listed_max)
    top_s, top_e = s[:k], emb[:k]
    if query is None:
        diam = lipschitz * (norms[:k] + max_norm)  # L·(‖e_i‖ + M) ≥ L·‖e_i − e_j‖ for every j

        def below(bound):  # (…, k): lower bounds on r(i, j) for every j scoring at most `bound` (…, 1)
            return (top_s - bound - slack) / diam
    else:
        axis = _axis_terms(top_s, top_e, query)

        def below(bound):
            return _unlisted(*axis, bound, max_norm, lipschitz, slack)
    radius = np.full(k, np.inf)
    pairs = 0
    j = k
    ahead, first = np.empty((0, k)), 0  # below(s[j]) for the next block starts, computed 64 at a time
    while j < n:
        # Lower bound for every remaining outsider (scores only decrease from j on).
        if j >= first + block * len(ahead):
            first = j
            ahead = below(s[j:n:block][:64, None])
        if np.all(ahead[(j - first) // block] >= radius):
            break
        stop = min(n, j + block)
        diff_norm = np.linalg.norm(top_e[:, None, :] - emb[None, j:stop, :], axis=-1)  # (k, b)
        margin = top_s[:, None] - s[None, j:stop] - slack
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(diff_norm > 0, margin / (lipschitz * np.where(diff_norm > 0, diff_norm, 1.0)), 0.0)
        radius = np.minimum(radius, r.min(1))
        pairs += r.size
        j = stop
    listed = radius.copy()
    tail = None
    if not complete:
        bound = s[-1] + unlisted_slack if unlisted_max is None else float(unlisted_max)
        tail = below(bound)
        radius = np.minimum(radius, tail)
    radius = np.maximum(radius, 0.0)
    set_radius = float(radius.min())
    order = set_radius
    if k > 1:
        dn = np.linalg.norm(top_e[:-1] - top_e[1:], axis=-1)
        m = top_s[:-1] - top_s[1:] - slack
        with np.errstate(divide="ignore", invalid="ignore"):
            consecutive = np.where(dn > 0, m / (lipschitz * np.where(dn > 0, dn, 1.0)), 0.0)
        order = min(order, float(max(consecutive.min(), 0.0)))
    return TopKCertificate(np.arange(k), top_s, radius, set_radius, order, pairs, listed, tail)


def certify_topk(query, gallery, k: int, lipschitz: float, slack: float = DEFAULT_SLACK) -> TopKCertificate:
    """Search a whole gallery (N, D) exactly for one query (D,) and certify its top-k (pruned).

    `positions` of the result are indices into the gallery.
    """
    q, g = _f64(query), _f64(gallery)
    scores = g @ q
    order = np.argsort(-scores, kind="stable")
    cert = certify_ranked(scores[order], g[order], k, lipschitz, complete=True, slack=slack, query=q)
    cert.positions = order[:k]
    return cert


def certify_topk_bruteforce(query, gallery, k: int, lipschitz: float, slack: float = DEFAULT_SLACK):
    """Reference: every pair (i ∈ top-k, j ∉ top-k), no pruning. Returns (positions, radius, set_radius)."""
    q, g = _f64(query), _f64(gallery)
    scores = g @ q
    order = np.argsort(-scores, kind="stable")
    top, rest = order[:k], order[k:]
    if rest.size == 0:
        return top, np.full(k, np.inf), float("inf")
    r = pair_radius(q[None, None, :], g[top][:, None, :], g[rest][None, :, :], lipschitz, slack)
    radius = np.maximum(r.min(1), 0.0)
    return top, radius, float(radius.min())
