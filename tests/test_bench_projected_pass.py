"""benchmarks/projected_pass.py: its bound holds against exact scores, its selection and gather compute what they
state, and --quick writes a report."""
import numpy as np
import pytest

from benchmarks.projected_pass import BLOCK, main, projected_codes, rows_above, upper_at


def test_projected_bound_is_above_every_exact_score():
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((400, 129)) * np.linspace(3, 0.1, 129)  # a spread that a few directions hold
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = np.concatenate([gallery[:20] + 0.05 * rng.standard_normal((20, 129)), rng.standard_normal((20, 129))])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for d in (1, 8, 32, 128):
        basis = np.linalg.qr(rng.standard_normal((129, d)))[0]
        y_hat, w, rho, eta = projected_codes(gallery, basis)
        assert np.abs(w).max() <= 127 and np.array_equal(w, np.rint(w))
        assert np.allclose(rho, np.linalg.norm(gallery - y_hat @ basis.T, axis=1))
        p = queries @ basis
        rest = np.linalg.norm(queries - p @ basis.T, axis=1)
        bound = p @ y_hat.T + rest[:, None] * rho[None] + np.linalg.norm(p, axis=1)[:, None] * eta
        scores = queries @ gallery.T
        assert (bound >= scores - 1e-12).all()
        if d == 128:  # almost everything in the basis: the bound is within the int8 rounding of the score
            assert (bound - scores).max() < 0.1


def test_rows_above_and_upper_at_match_numpy():
    rng = np.random.default_rng(0)
    bounds = rng.random(1000).astype(np.float32)
    bounds[128:192] = 0.0  # a block skipped by its maximum
    maxima = np.array([bounds[i:i + BLOCK].max() for i in range(0, 1000, BLOCK)], np.float32)
    out = np.empty(1000, np.int64)
    count = rows_above(bounds, maxima, BLOCK, np.float32(0.9), out)
    assert np.array_equal(out[:count], np.flatnonzero(bounds > np.float32(0.9)))
    codes = rng.integers(-127, 128, (50, 129), dtype=np.int8)
    scale, resid = rng.random(50, dtype=np.float32), rng.random(50, dtype=np.float32)
    q = rng.standard_normal(129).astype(np.float32)
    rows = np.array([3, 7, 49], np.int64)
    got = np.empty(3, np.float32)
    upper_at(codes, scale, resid, q, np.float32(2.0), rows, got)
    want = scale[rows] * (codes[rows].astype(np.float64) @ q) + 2.0 * resid[rows]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4)


def test_projected_pass_quick_report(tmp_path):
    report = main(["--quick", "--out", str(tmp_path / "pp")])
    assert [row["dims"] for row in report["survivors"]] == [16, 32]
    for row in report["survivors"]:
        assert row["violations"] == 0
        assert 0 <= row["survivors_median"] <= row["survivors_p90"] <= 1
    timing = report["timing"][0]
    assert timing["n"] == 50_000 and set(timing["median_ms"]) == {"int8"} | set(timing["speedup_over_int8"])
    for name, ratio in timing["speedup_over_int8"].items():
        assert ratio == pytest.approx(timing["median_ms"]["int8"]["total"] / timing["median_ms"][name]["total"],
                                      rel=0.01)
        assert 0 <= timing["gathered"][name] <= 50_000
    assert (tmp_path / "pp.md").read_text().count("| 50,000 |") == 1 + len(timing["speedup_over_int8"])
