"""2AFC scoring, certified scoring and the attacks, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from encoder.evaluate import (autoattack_2afc, certified_sample_scores, combine_results, eps_label, evaluate_2afc,
                              format_table, pgd_2afc, twoafc_sample_scores, twoafc_score)
from encoder.protocol import TorchEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_twoafc_score_is_dreamsims_formula_with_ties_counting_half():
    d0 = torch.tensor([0.1, 0.5, 0.3, 0.2])
    d1 = torch.tensor([0.2, 0.4, 0.3, 0.9])
    p = torch.tensor([0.25, 0.8, 0.6, 1.0])  # P(x1 chosen)
    # x0 chosen → 1 − p; x1 chosen → p; tie → ½
    assert twoafc_sample_scores(d0, d1, p).tolist() == pytest.approx([0.75, 0.8, 0.5, 0.0])
    assert twoafc_score(d0, d1, p) == pytest.approx((0.75 + 0.8 + 0.5 + 0.0) / 4)


def test_certified_score_counts_correct_decisions_whose_radius_exceeds_eps():
    e = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    e0 = torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0]])
    e1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.tensor([0.0, 1.0, 0.0])  # row 0 correct (x0 closer), row 1 wrong, row 2 a tie (radius 0)
    # R = |⟨e, e0 − e1⟩| / (L‖e0 − e1‖) = 0.6 / sqrt(0.4) = 0.9487 for rows 0 and 1
    r = 0.6 / math.sqrt(0.4)
    assert certified_sample_scores(e, e0, e1, p, 1.0, r - 1e-3, slack=0).tolist() == [1.0, 0.0, 0.0]
    assert certified_sample_scores(e, e0, e1, p, 1.0, r + 1e-3, slack=0).tolist() == [0.0, 0.0, 0.0]
    # L = 2 halves the radius
    assert certified_sample_scores(e, e0, e1, p, 2.0, r / 2 - 1e-3, slack=0)[0] == 1.0
    assert certified_sample_scores(e, e0, e1, p, 2.0, r / 2 + 1e-3, slack=0)[0] == 0.0


class AngleEncoder(TorchEncoder):
    """e(x) = (cos θ, sin θ), θ = a·⟨u, x − 0.5⟩ with u the normalised all-ones direction: L = a.

    Flipping the decision between θ0 = 0 and θ1 = 1 from θ = 0.3 needs |Δθ| = 0.2, i.e. a
    perturbation of ℓ2 norm exactly 0.2/a along u (and nothing smaller can do it).
    """

    def __init__(self, a: float = 1.0, size: int = 4):
        super().__init__()
        self.name, self.input_size, self.dim, self.lipschitz, self.a = "angle", size, 2, a, a
        self.register_buffer("u", torch.ones(3 * size * size) / math.sqrt(3 * size * size))

    def _embed(self, x):
        theta = self.a * ((x.flatten(1) - 0.5) @ self.u)
        return torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)


def _breakable_triplets(n: int = 6, a: float = 1.0, size: int = 4):
    """n triplets, distinct references (orthogonal offsets), θ(ref) = 0.3 toward the chosen image."""
    enc = AngleEncoder(a, size)
    u = enc.u.view(3, size, size)
    g = torch.Generator().manual_seed(0)
    refs, x0s, x1s, ps = [], [], [], []
    for i in range(n):
        v = torch.randn(3, size, size, generator=g)
        v = v - (v.flatten() @ enc.u) * u  # orthogonal to u: θ unchanged
        base = 0.5 + 0.05 * v / v.norm()
        ref = base + (0.3 / a) * u
        near, far = base, base + (1.0 / a) * u  # θ = 0 and θ = 1
        chosen_right = i % 2 == 1
        refs.append(ref)
        x0s.append(far if chosen_right else near)
        x1s.append(near if chosen_right else far)
        ps.append(1.0 if chosen_right else 0.0)
    return enc, torch.stack(refs), torch.stack(x0s), torch.stack(x1s), torch.tensor(ps)


@pytest.mark.parametrize("attack", [autoattack_2afc, pgd_2afc])
def test_attacks_break_a_breakable_case_exactly_beyond_its_minimal_perturbation(attack):
    enc, ref, x0, x1, p = _breakable_triplets()
    # minimal flipping perturbation: 0.2 (ℓ2)
    e = enc.embed(ref)
    assert twoafc_score(1 - (e * enc.embed(x0)).sum(1), 1 - (e * enc.embed(x1)).sum(1), p) == 1.0
    for eps, expected in ((0.25, 0.0), (0.15, 1.0)):
        xa = attack(enc, ref, x0, x1, p, eps, "L2", 30)
        assert (xa - ref).flatten(1).norm(dim=1).max() <= eps + 1e-5
        ea = enc.embed(xa)
        assert twoafc_score(1 - (ea * enc.embed(x0)).sum(1), 1 - (ea * enc.embed(x1)).sum(1), p) == expected


def test_evaluate_reports_certified_below_the_attack_and_a_table():
    enc, ref, x0, x1, p = _breakable_triplets()
    res = evaluate_2afc(enc, ref, x0, x1, p, eps=(0.15, 0.25), attacks=("autoattack-L2", "pgd-Linf"),
                        attack_eps={"autoattack-L2": (0.15, 0.25)}, n_iter=20)
    # certified radius: (cos .3 − cos .7) / (2 sin .5) = 0.1987 < 0.2 (the true minimum): sound
    assert res["natural"] == 1.0 and res["median_radius"] == pytest.approx(0.1987, abs=1e-3)
    assert res["certified"] == {"0.15": 1.0, "0.25": 0.0}
    assert res["empirical"]["autoattack-L2"] == {"0.15": 1.0, "0.25": 0.0}
    assert set(res["empirical"]["pgd-Linf"]) == {"1/255", "2/255", "4/255"}
    table = format_table([res])
    assert table.splitlines()[0].startswith("| encoder | natural | cert 0.15")
    assert eps_label(36 / 255) == "36/255"


def test_test_score_is_the_size_weighted_mean_of_its_parts():
    a = {"encoder": "m", "input_size": 4, "lipschitz": 1.0, "radius_space": "x", "n": 30, "natural": 0.9,
         "certified": {"36/255": 0.5}, "empirical": {"pgd-L2": {"36/255": 0.6}}, "attacked_n": 10}
    b = {**a, "n": 10, "natural": 0.5, "certified": {"36/255": 0.1}, "empirical": {"pgd-L2": {"36/255": 0.2}},
         "attacked_n": 30}
    res = combine_results({"test_imagenet": a, "test_no_imagenet": b})
    assert res["n"] == 40 and res["natural"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert res["certified"]["36/255"] == pytest.approx((30 * 0.5 + 10 * 0.1) / 40)
    assert res["empirical"]["pgd-L2"]["36/255"] == pytest.approx((10 * 0.6 + 30 * 0.2) / 40)


def test_train_eval_command_scores_a_nights_folder_and_writes_json(tmp_path, capsys):
    from encoder.data import make_synthetic_nights
    from retrieval.cli import main

    g = torch.Generator().manual_seed(0)
    photos = [(n, torch.rand(3, 24, 24, generator=g)) for n in ("a", "b")]
    make_synthetic_nights(photos, tmp_path, per_image=3, size=16, split="test", kinds=("noise",))
    rc = main(["train", "eval", "pixels:16", "--nights", str(tmp_path), "--attacks", "pgd-L2", "--attack-eps", "36",
               "--iters", "3", "--json", str(tmp_path / "out.json")])
    assert rc == 0
    assert "| pixels:16 | 100.0 |" in capsys.readouterr().out  # less noise = closer in pixels
    import json

    (res,) = json.loads((tmp_path / "out.json").read_text())
    assert res["n"] == 6 and res["split"] == "test" and res["natural"] == 1.0
