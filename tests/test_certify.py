"""Certificates (encoder/certify.py): hand-computed values, the pruned top-k certificate against the
brute-force all-pairs answer on random galleries, the pruning's savings, and the geometry (a radius
is exactly the distance of e(q) to a bisecting hyperplane, divided by L).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from encoder.certify import (AXIS_ALLOWANCE, DEFAULT_SLACK, certify_ranked, certify_topk, certify_topk_bruteforce, pair_radius,
                             twoafc_radius, unlisted_radius)


def _unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _gallery(seed: int, n: int, d: int, clustered: bool):
    rng = np.random.default_rng(seed)
    q = _unit(rng, 1, d)[0]
    if clustered:  # items near the query plus duplicates: near-ties and exact ties at the top-k border
        g = _unit(rng, n, d) * 0.3 + q
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        g[n // 2:] = g[: n - n // 2] if rng.random() < 0.3 else g[n // 2:]
    else:
        g = _unit(rng, n, d)
    return q, g


# --- hand-computed values -----------------------------------------------------------------------

def test_twoafc_radius_hand_computed():
    e_ref, e0, e1 = np.array([1.0, 0, 0]), np.array([0.6, 0.8, 0]), np.array([0.0, 1, 0])
    # ⟨e_ref, e0 − e1⟩ = 0.6, ‖e0 − e1‖ = √0.4
    assert twoafc_radius(e_ref, e0, e1, 1.0, slack=0) == pytest.approx(0.6 / math.sqrt(0.4))
    assert twoafc_radius(e_ref, e0, e1, 2.0, slack=0) == pytest.approx(0.3 / math.sqrt(0.4))
    assert twoafc_radius(e_ref, e0, e1, 1.0, slack=0.1) == pytest.approx(0.5 / math.sqrt(0.4))
    assert twoafc_radius(e_ref, e1, e0, 1.0, slack=0) == pytest.approx(0.6 / math.sqrt(0.4))  # symmetric
    assert twoafc_radius(e_ref, e0, e0, 1.0) == 0.0  # a tie is never certified
    # default slack: float32 embeddings are trusted to 1e-5 only
    assert twoafc_radius(e_ref, e0, e1, 1.0) == pytest.approx((0.6 - DEFAULT_SLACK) / math.sqrt(0.4))
    batch = twoafc_radius(np.stack([e_ref, e_ref]), np.stack([e0, e1]), np.stack([e1, e1]), 1.0, slack=0)
    assert batch.shape == (2,) and batch[0] == pytest.approx(0.6 / math.sqrt(0.4)) and batch[1] == 0


def test_twoafc_radius_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    e = torch.nn.functional.normalize(torch.randn(4, 5), dim=1)
    np.testing.assert_allclose(twoafc_radius(e, e.flip(0), e.roll(1, 0), 1.0),
                               twoafc_radius(e.numpy(), e.flip(0).numpy(), e.roll(1, 0).numpy(), 1.0))


def test_pair_radius_hand_computed_and_signed():
    q, ei, ej = np.array([1.0, 0]), np.array([0.8, 0.6]), np.array([0.6, 0.8])
    assert pair_radius(q, ei, ej, 1.0) == pytest.approx(0.2 / math.sqrt(0.08))
    assert pair_radius(q, ej, ei, 1.0) == pytest.approx(-0.2 / math.sqrt(0.08))
    assert pair_radius(q, ei, ej, 4.0, slack=0.05) == pytest.approx(0.15 / (4 * math.sqrt(0.08)))
    assert pair_radius(q, ei, ei, 1.0) == 0.0
    assert pair_radius(q[None, None], np.stack([ei, ej])[:, None], np.stack([ej, ei, ei])[None], 1.0).shape == (2, 3)


def test_topk_certificate_hand_computed():
    # q = e1; gallery on the unit circle at angles 0.1, 0.3, 0.6, 1.2 rad; k = 2.
    ang = np.array([0.1, 0.3, 0.6, 1.2])
    g = np.stack([np.cos(ang), np.sin(ang)], 1)
    q = np.array([1.0, 0.0])
    cert = certify_topk(q, g, 2, 1.0, slack=0)

    def r(a, b):  # (cos a − cos b) / ‖e_a − e_b‖ = (cos a − cos b) / (2 sin(|a − b|/2))
        return (math.cos(a) - math.cos(b)) / (2 * math.sin(abs(a - b) / 2))

    assert list(cert.positions) == [0, 1]
    np.testing.assert_allclose(cert.radius, [min(r(0.1, 0.6), r(0.1, 1.2)), min(r(0.3, 0.6), r(0.3, 1.2))])
    # Not the pair with the smallest score gap: r(0.1, 0.6) < r(0.3, 0.6) because e_0.1 − e_0.6 is longer.
    set_radius = min(r(0.1, 0.6), r(0.1, 1.2), r(0.3, 0.6), r(0.3, 1.2))
    assert set_radius == r(0.1, 0.6)
    assert cert.set_radius == pytest.approx(set_radius)
    assert cert.order_radius == pytest.approx(min(set_radius, r(0.1, 0.3)))
    assert cert.scaled(2.0).set_radius == pytest.approx(set_radius / 2)
    np.testing.assert_allclose(cert.scaled(2.0).radius, cert.radius / 2)


def test_ties_at_the_border_are_not_certified():
    g = np.array([[1.0, 0], [0.6, 0.8], [0.6, 0.8], [0, 1.0]])
    cert = certify_topk(np.array([1.0, 0]), g, 2, 1.0)
    assert cert.set_radius == 0.0 and cert.radius[0] > 0 and cert.radius[1] == 0.0


def test_whole_gallery_in_topk_is_certified_at_infinity():
    g = _unit(np.random.default_rng(0), 3, 4)
    cert = certify_topk(g[0], g, 3, 1.0)
    assert cert.set_radius == math.inf and cert.pairs_evaluated == 0
    assert certify_topk_bruteforce(g[0], g, 3, 1.0)[2] == math.inf


def test_certify_ranked_rejects_bad_input():
    s = np.array([0.9, 0.5, 0.7])
    with pytest.raises(ValueError, match="sorted"):
        certify_ranked(s, np.eye(3), 1, 1.0, complete=True)
    with pytest.raises(ValueError, match="k="):
        certify_ranked(np.sort(s)[::-1], np.eye(3), 4, 1.0, complete=True)
    with pytest.raises(ValueError, match="k="):
        certify_ranked(np.sort(s)[::-1], np.eye(3), 0, 1.0, complete=True)


# --- pruned == brute force -------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 60), d=st.integers(2, 12), k_frac=st.floats(0, 1),
       lipschitz=st.sampled_from([1.0, 2.5, 1 / 0.224]), clustered=st.booleans(), block=st.sampled_from([1, 3, 32]))
def test_pruned_topk_certificate_equals_brute_force(seed, n, d, k_frac, lipschitz, clustered, block):
    q, g = _gallery(seed, n, d, clustered)
    k = 1 + int(k_frac * (n - 1))
    cert = certify_topk(q, g, k, lipschitz)
    top, radius, set_radius = certify_topk_bruteforce(q, g, k, lipschitz)
    np.testing.assert_array_equal(cert.positions, top)
    np.testing.assert_allclose(cert.radius, radius, rtol=1e-9, atol=1e-12)
    assert cert.set_radius == pytest.approx(set_radius, rel=1e-9, abs=1e-12)
    assert cert.pairs_evaluated <= k * (n - k)
    # block size only changes how much is computed, never the answer
    scores = g @ q
    order = np.argsort(-scores, kind="stable")
    again = certify_ranked(scores[order], g[order], k, lipschitz, complete=True, block=block)
    np.testing.assert_allclose(again.radius, cert.radius, rtol=1e-9, atol=1e-12)
    # order radius: the top-k set radius, and every consecutive pair inside the top-k
    consecutive = [pair_radius(q, g[top[i]], g[top[i + 1]], lipschitz, DEFAULT_SLACK) for i in range(k - 1)]
    assert cert.order_radius == pytest.approx(max(0.0, min([set_radius, *consecutive])), rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(3, 60), d=st.integers(2, 10), k_frac=st.floats(0, 1),
       m_frac=st.floats(0, 1), clustered=st.booleans())
def test_truncated_list_certificate_is_exact_bound_and_never_exceeds_the_full_one(seed, n, d, k_frac, m_frac,
                                                                                    clustered):
    q, g = _gallery(seed, n, d, clustered)
    k = 1 + int(k_frac * (n - 2))
    m = k + int(m_frac * (n - k))  # the index returned m ≥ k items out of n
    scores = g @ q
    order = np.argsort(-scores, kind="stable")
    cert = certify_ranked(scores[order[:m]], g[order[:m]], k, 1.0, complete=False)
    full = certify_topk(q, g, k, 1.0)
    assert np.all(cert.radius <= full.radius + 1e-12)  # sound: never more than the whole gallery allows
    # exact value: listed outsiders pair by pair, unlisted ones by (s_i − s_last)/(L·(‖e_i‖ + M)), with M the
    # default bound on unlisted norms for an incomplete list: max(largest listed norm, 1 + 1e-6)
    top_s, s_last = scores[order[:k]], scores[order[m - 1]]
    listed = [pair_radius(q, g[order[i]], g[order[k:m]], 1.0, DEFAULT_SLACK).min() if m > k else np.inf
              for i in range(k)]
    big_m = max(np.linalg.norm(g[order[:m]], axis=1).max(), 1 + 1e-6)
    diam = np.linalg.norm(g[order[:k]], axis=1) + big_m
    expected = np.maximum(np.minimum(listed, (top_s - s_last - DEFAULT_SLACK) / diam), 0)
    np.testing.assert_allclose(cert.radius, expected, rtol=1e-9, atol=1e-12)
    # Given the query, unlisted items are bounded by `unlisted_radius`: never below the plain bound, never above
    # the whole gallery's certificate, and exactly min(listed pairs, unlisted_radius) otherwise.
    known = certify_ranked(scores[order[:m]], g[order[:m]], k, 1.0, complete=False, query=q)
    assert np.all(known.radius >= cert.radius - 1e-12) and np.all(known.radius <= full.radius + 1e-12)
    tail = unlisted_radius(top_s, g[order[:k]], q, s_last, big_m, 1.0, DEFAULT_SLACK)
    np.testing.assert_allclose(known.radius, np.maximum(np.minimum(listed, tail), 0), rtol=1e-9, atol=1e-12)


# --- the bound on unlisted items (unlisted_radius): attained, never beaten ------------------------

def test_unlisted_radius_gives_no_radius_at_an_exact_tie_and_takes_m_from_the_items():
    # (review) An item tied with B at slack 0 gets no radius, although B/ν·ν ≠ B in floats; and an e_i longer
    # than the M given raises M (the proof needs ‖e_i‖ ≤ M): e_j = (0, −1) has r = 0.894 < 0.930, the answer
    # with M = 1.
    cert = certify_ranked([1.887], [[0.48, -0.61]], 1, 1.0, complete=False, slack=0.0, max_norm=1.0,
                          query=[1.72, -1.74])
    assert cert.radius[0] == 0.0
    got = float(unlisted_radius([2.0], [[2.0, 0.0]], [1.0, 0.0], 0.9, 1.0, 1.0)[0])
    assert got <= float(pair_radius(np.array([1.0, 0.0]), np.array([2.0, 0.0]), np.array([0.0, -1.0]), 1.0))


def _unlisted_case(seed, d):
    """Query of norm ν ∈ [0.5, 1.5], item e_i of norm ≤ M, M ∈ [1, 1.2], a bound B below s_i, slack c."""
    rng = np.random.default_rng(seed)
    nu, big_m = rng.uniform(0.5, 1.5), rng.uniform(1.0, 1.2)
    q = _unit(rng, 1, d)[0] * nu
    e_i = (_unit(rng, 1, d)[0] * 0.5 + q / nu * rng.uniform(0, 2)) if rng.random() < 0.8 else q / nu
    e_i *= big_m * rng.uniform(0.5, 1.0) / np.linalg.norm(e_i)
    s_i = float(q @ e_i)
    bound = s_i - rng.uniform(1e-4, 1.0) * (s_i + nu * big_m)  # anywhere between s_i and −νM
    slack = float(rng.choice([0.0, 1e-6, 1e-3]))
    return q, e_i, s_i, bound, big_m, slack


def _feasible(e, q, bound, big_m):
    """A point with ⟨q, e⟩ ≤ B and ‖e‖ ≤ M: the q̂-component clipped to B/ν, then the rest shrunk to fit."""
    nu = np.linalg.norm(q)
    qh = q / nu
    a = np.minimum(e @ qh, bound / nu)
    perp = e - np.outer(e @ qh, qh) if e.ndim == 2 else e - (e @ qh) * qh
    room = np.sqrt(np.maximum(big_m ** 2 - a ** 2, 0.0))
    pn = np.linalg.norm(perp, axis=-1)
    scale = np.minimum(1.0, room / np.maximum(pn, 1e-300))
    return (a[..., None] * qh + perp * scale[..., None]) if e.ndim == 2 else a * qh + perp * scale


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 24))
@example(seed=61, d=23)  # (e_i ∥ q, and the test's own u drawn as q̂: found by a run of the suite)
@example(seed=144, d=2)  # (e_i nearly ∥ q: the test's own e_j* was off by 1.2e-12 before perp was projected twice)
def test_unlisted_radius_is_attained_by_the_worst_placed_item(seed, d):
    # The docstring's e_j* = B̂q̂ − √(M² − B̂²)·u scores exactly B, has norm M, and r(i, j*) equals the bound:
    # no larger lower bound is sound. (AXIS_ALLOWANCE makes the bound slightly smaller, never larger.)
    q, e_i, s_i, bound, big_m, slack = _unlisted_case(seed, d)
    got = float(unlisted_radius([s_i], e_i[None], q, bound, big_m, 2.0, slack)[0])
    nu = np.linalg.norm(q)
    qh, bh = q / nu, bound / nu
    perp = e_i - (e_i @ qh) * qh
    perp -= (perp @ qh) * qh  # (again: for e_i nearly ∥ q, ~1e-16 left along q̂ is ~1e-12 once perp is normalised)
    if np.linalg.norm(perp) < 1e-9:  # e_i ∥ q: any unit u ⟂ q (a stream of its own: the case's could give q̂ again)
        u = _unit(np.random.default_rng([seed, 1]), 1, d)[0]
        for _ in range(2):  # (twice: one projection leaves rounding of order 1e-16 along q̂)
            u -= (u @ qh) * qh
        perp = u * 1e-30
    e_j = bh * qh - np.sqrt(big_m ** 2 - bh ** 2) * perp / np.linalg.norm(perp)
    assert q @ e_j == pytest.approx(bound, abs=1e-12) and np.linalg.norm(e_j) == pytest.approx(big_m, rel=1e-12)
    worst = float(pair_radius(q, e_i, e_j, 2.0, slack))
    assert got <= worst + 1e-12
    if s_i - bound > slack:  # equal but for AXIS_ALLOWANCE (relative ≤ AXIS_ALLOWANCE/‖e_i − e_j*‖) and M's 1e-12
        assert got >= worst * (1 - 1.01 * AXIS_ALLOWANCE / np.linalg.norm(e_i - e_j) - 1e-9) - 1e-12
    plain = (s_i - bound - slack) / (2.0 * (np.linalg.norm(e_i) + big_m))
    assert got >= plain - 1e-11 * abs(plain) - 1e-15  # (the plain bound is evaluated with M raised by 1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 24))
def test_no_item_scoring_at_most_the_bound_beats_unlisted_radius(seed, d):
    # Exhaustive sampling of the feasible set {⟨q, e⟩ ≤ B, ‖e‖ ≤ M} and projected gradient descent on
    # r(i, j) over it (the attacker places e_j): no feasible item gets below the bound; the bound falls with B.
    q, e_i, s_i, bound, big_m, slack = _unlisted_case(seed, d)
    lip = 1.5
    got = float(unlisted_radius([s_i], e_i[None], q, bound, big_m, lip, slack)[0])
    rng = np.random.default_rng(seed + 1)
    cloud = _feasible(_unit(rng, 4000, d) * big_m * rng.uniform(0, 1, (4000, 1)) ** (1 / d), q, bound, big_m)
    assert np.all(cloud @ q <= bound + 1e-12) and np.all(np.linalg.norm(cloud, axis=1) <= big_m * (1 + 1e-12))
    assert pair_radius(q, e_i, cloud, lip, slack).min() >= got - 1e-12
    starts = cloud[np.argsort(pair_radius(q, e_i, cloud, lip, slack))[:16]]
    for e in starts:
        for step in np.geomspace(0.1, 1e-4, 300):
            diff = e_i - e
            n = np.linalg.norm(diff)
            if n == 0:
                break
            margin = q @ diff - slack
            grad = -(q / n - margin * diff / n ** 3) / lip  # ∇_e of r(i, e)
            e = _feasible(e - step * grad / max(np.linalg.norm(grad), 1e-300), q, bound, big_m)
            assert float(pair_radius(q, e_i, e, lip, slack)) >= got - 1e-12
    higher = float(unlisted_radius([s_i], e_i[None], q, (bound + s_i) / 2, big_m, lip, slack)[0])
    assert higher <= got + 1e-15


def test_pruning_skips_most_pairs_on_a_clustered_gallery():
    rng = np.random.default_rng(0)
    d, k = 16, 5
    q = _unit(rng, 1, d)[0]
    near = _unit(rng, 20, d) * 0.15 + q  # 20 items close to the query
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    far = _unit(rng, 5000, d)  # a large gallery elsewhere on the sphere
    g = np.concatenate([far[:2500], near, far[2500:]])
    cert = certify_topk(q, g, k, 1.0)
    n = len(g)
    assert cert.pairs_evaluated < 0.02 * k * (n - k), (cert.pairs_evaluated, k * (n - k))
    top, radius, set_radius = certify_topk_bruteforce(q, g, k, 1.0)
    np.testing.assert_allclose(cert.radius, radius, rtol=1e-9)
    assert cert.set_radius > 0


# --- geometry: the radius is the distance to the bisector ---------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(4, 30), d=st.integers(2, 8), lipschitz=st.sampled_from([1.0, 3.0]))
def test_set_radius_is_tight_in_embedding_space(seed, n, d, lipschitz):
    """Moving e(q) by L·r·(1 − 1e-6) in any direction keeps the top-k; moving it by L·r·(1 + 1e-6)
    toward the critical bisector changes it (no slack, so the radius is the exact geometric one)."""
    rng = np.random.default_rng(seed)
    q, g = _gallery(seed, n, d, clustered=bool(seed % 2))
    k = 1 + seed % (n - 1)
    cert = certify_topk(q, g, k, lipschitz, slack=0)
    top = set(cert.positions.tolist())
    if cert.set_radius <= 1e-6:  # (a margin near float64 rounding cannot show the flip below)
        return
    step = lipschitz * cert.set_radius
    for _ in range(20):  # random moves inside the ball keep the top-k
        u = rng.normal(size=d)
        q2 = q + u / np.linalg.norm(u) * step * (1 - 1e-6) * rng.random() ** (1 / d)
        assert set(np.argsort(-(g @ q2), kind="stable")[:k].tolist()) == top
    # the critical pair: its bisector is exactly at distance L·r
    pos = cert.positions[int(np.argmin(cert.radius))]
    outside = [j for j in range(n) if j not in top]
    j = outside[int(np.argmin([pair_radius(q, g[pos], g[j], lipschitz) for j in outside]))]
    u = (g[j] - g[pos]) / np.linalg.norm(g[j] - g[pos])
    inside, beyond = q + u * step * (1 - 1e-6), q + u * step * (1 + 1e-6)
    assert g[pos] @ inside > g[j] @ inside
    assert g[pos] @ beyond < g[j] @ beyond


def test_order_radius_is_tight_for_a_consecutive_swap():
    ang = np.array([0.0, 0.05, 0.5, 1.0])
    g = np.stack([np.cos(ang), np.sin(ang)], 1)
    q = np.array([np.cos(0.01), np.sin(0.01)])
    cert = certify_topk(q, g, 3, 1.0, slack=0)
    r01 = pair_radius(q, g[0], g[1], 1.0)
    assert cert.order_radius == pytest.approx(r01) and cert.order_radius < cert.set_radius
    u = (g[1] - g[0]) / np.linalg.norm(g[1] - g[0])
    assert (g @ (q + u * r01 * (1 - 1e-6))).argmax() == 0
    assert (g @ (q + u * r01 * (1 + 1e-6))).argmax() == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(1, 5), st.sampled_from([0.5, 1.0, 3.0]))
def test_no_radius_reaches_one_over_l(seed, n, k, lipschitz):
    """The module doc's ceiling: for unit vectors every top-k and 2AFC radius is below 1/L (Cauchy–Schwarz),
    and the pair radius attains 1/L in the extreme configuration e_i = e(q), e_j = −e(q)."""
    rng = np.random.default_rng(seed)
    dim = 6
    g = rng.standard_normal((n, dim))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal(dim)
    q /= np.linalg.norm(q)
    k = min(k, n - 1)
    cert = certify_topk(q, g, k, lipschitz, slack=0.0)
    assert np.all(cert.radius <= (1 + 1e-12) / lipschitz)
    r2afc = twoafc_radius(q, g[:1], g[1:2], lipschitz, slack=0.0)
    assert np.all(r2afc <= (1 + 1e-12) / lipschitz)
    extreme = pair_radius(q, q, -q, lipschitz, slack=0.0)
    assert math.isclose(float(extreme), 1 / lipschitz, rel_tol=1e-12)
