"""Retrieval metrics against hand-computed values, robrank's published ERS, and brute-force certificates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.certify import certify_topk_bruteforce
from retrieval.metrics import (ERS_KEYS, certified_radii, certified_recall_at_k, ers, ers_normalize,
                               mean_average_precision, overlap_at_k, percentile_rank, recall_at_k)

# robrank README / CVPR 2022 Table: CUB, ResNet-18, triplet, no defence — "ERS 3.8".
CUB_UNDEFENDED = {"CA+": 0.0, "CA-": 100.0, "QA+": 0.0, "QA-": 99.9, "TMA": 0.883, "ES:D": 1.762,
                  "ES:R": 0.0, "LTM": 0.0, "GTM": 14.1, "GTT": 0.0}


def test_ers_reproduces_robranks_published_cub_number():
    norm = ers_normalize(CUB_UNDEFENDED)
    expected = {"CA+": 0.0, "CA-": 0.0, "QA+": 0.0, "QA-": 0.1, "TMA": 11.7, "ES:D": 11.9, "ES:R": 0.0,
                "LTM": 0.0, "GTM": 14.1, "GTT": 0.0}
    for key in ERS_KEYS:
        assert norm[key] == pytest.approx(expected[key], abs=1e-9)
    assert round(ers(CUB_UNDEFENDED), 1) == 3.8


def test_ers_of_an_unmoved_model_is_high_and_missing_scores_are_refused():
    unmoved = {"CA+": 50.0, "CA-": 0.5, "QA+": 50.0, "QA-": 0.5, "TMA": 0.0, "ES:D": 0.0,
               "ES:R": 100.0, "LTM": 100.0, "GTM": 100.0, "GTT": 100.0}
    assert ers(unmoved) == pytest.approx(99.9)
    with pytest.raises(ValueError, match="missing"):
        ers({"CA+": 1.0})


# 2 queries, 4 gallery items; labels: gallery [0, 1, 0, 2], queries [0, 2]
SIM = np.array([[0.9, 0.8, 0.1, 0.5],   # ranking 0,1,3,2 → matches at ranks 1 and 4
                [0.2, 0.9, 0.3, 0.4]])  # ranking 1,3,2,0 → match (item 3) at rank 2
GL, QL = np.array([0, 1, 0, 2]), np.array([0, 2])


def test_recall_at_k_and_map_match_hand_computation():
    assert recall_at_k(SIM, QL, GL, (1, 2, 4)) == {1: 50.0, 2: 100.0, 4: 100.0}
    ap0 = (1 / 1 + 2 / 4) / 2
    ap1 = 1 / 2
    assert mean_average_precision(SIM, QL, GL) == pytest.approx(100 * (ap0 + ap1) / 2)


def test_leave_one_out_never_counts_the_query_itself():
    sim = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.1]])
    gl = np.array([0, 1, 0])
    # query 0 is gallery item 0: without it, its top-1 is item 2 (same class); query 1 has no other match
    assert recall_at_k(sim, gl[:2], gl, (1,), self_index=np.array([0, 1])) == {1: 50.0}
    assert mean_average_precision(sim, gl[:2], gl, self_index=np.array([0, 1])) == pytest.approx(100.0)


def test_percentile_rank_counts_items_ahead_of_each_target():
    pr = percentile_rank(SIM, np.array([[2], [1]]))
    assert pr.tolist() == [75.0, 0.0]
    assert percentile_rank(SIM, np.array([[2, 1]]).repeat(2, 0))[0] == pytest.approx((75 + 25) / 2)
    assert percentile_rank(SIM, np.array([[2]]).repeat(2, 0), self_index=np.array([0, -1]))[0] == 50.0


def test_overlap_at_k():
    assert overlap_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 9, 1], [7, 8, 9]])).tolist() == [2 / 3, 0.0]


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3])
def test_certified_radii_agree_with_brute_force_certificates(k):
    rng = np.random.default_rng(0)
    g = _unit(rng.normal(size=(30, 8)))
    q = _unit(g[:10] + 0.3 * rng.normal(size=(10, 8)))
    gl, ql = np.arange(30), np.arange(10)
    radii = certified_radii(q, g, ql, gl, lipschitz=2.0, k=k)
    for i in range(10):
        top, r, _ = certify_topk_bruteforce(q[i], g, k, 2.0)
        expected = r[gl[top] == ql[i]].max() if (gl[top] == ql[i]).any() else 0.0
        assert radii[i] == pytest.approx(expected, abs=1e-9)


def test_certified_recall_is_monotone_in_eps_and_bounded_by_clean_recall():
    rng = np.random.default_rng(1)
    g = _unit(rng.normal(size=(40, 16)))
    q = _unit(g[:20] + 0.2 * rng.normal(size=(20, 16)))
    gl, ql = np.arange(40), np.arange(20)
    eps = [0.0, 0.01, 0.05, 0.1, 0.5]
    cert = certified_recall_at_k(torch.tensor(q), torch.tensor(g), ql, gl, 1.0, eps)
    values = [cert[e] for e in eps]
    assert values == sorted(values, reverse=True)
    assert values[0] <= recall_at_k(q @ g.T, ql, gl)[1]
    assert certified_recall_at_k(q, g, ql, gl, None, eps) == {}
