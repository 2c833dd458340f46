"""The attack engine (encoder/attack/): one PGD and one pyautoattack wrapper for 2AFC and retrieval."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from encoder.attack import PGDConfig, canonical_norm, make_autoattack, run_autoattack


class _Linear(nn.Module):
    def __init__(self, classes: int = 5, size: int = 4):
        super().__init__()
        w = torch.randn(classes, 3 * size * size, generator=torch.Generator().manual_seed(0))
        self.register_buffer("w", w)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


@pytest.mark.parametrize("n_iter", [7, 20, 250])
def test_apgd_schedule_is_the_one_its_constructor_derives_from_the_same_n_iter(n_iter):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model = _Linear()
    aa = make_autoattack(model, norm="l2", eps=0.5, device="cpu", version="custom", attacks=["apgd-ce", "apgd-t"],
                         n_iter=n_iter)
    for built, fresh in ((aa.apgd, APGDAttack(model, n_iter=n_iter, eps=0.5, device="cpu")),
                         (aa.apgd_targeted, APGDAttack_targeted(model, n_iter=n_iter, eps=0.5, device="cpu"))):
        for name in ("n_iter", "n_iter_2", "n_iter_min", "size_decr"):
            assert getattr(built, name) == getattr(fresh, name), name
    assert aa.apgd.n_restarts == 1  # "custom": one restart, as in the standard version


def test_2afc_autoattack_uses_the_schedule_of_its_n_iter_and_leaves_global_state_alone(monkeypatch):
    """The 2AFC evaluation goes through the same wrapper: APGD runs with the schedule made for its
    n_iter (not the constructor's 100), the global RNG is not reseeded and no logger level changes."""
    from pyautoattack.autopgd_base import APGDAttack

    from encoder.evaluate import autoattack_2afc
    from test_evaluate_2afc import _breakable_triplets

    seen = []
    real = APGDAttack.attack_single_run

    def spy(self, *a, **kw):
        seen.append((self.n_iter, self.n_iter_2, self.n_iter_min, self.size_decr))
        return real(self, *a, **kw)

    monkeypatch.setattr(APGDAttack, "attack_single_run", spy)
    enc, ref, x0, x1, p = _breakable_triplets(n=2)
    aa_logger = logging.getLogger("auto-attack")
    level = aa_logger.level
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    autoattack_2afc(enc, ref, x0, x1, p, 0.25, "L2", n_iter=10)
    assert torch.equal(torch.get_rng_state(), state), "the global random state changed"
    assert aa_logger.level == level
    assert seen and set(seen) == {(10, 2, 1, 1)}


def test_run_autoattack_reports_steps_and_stays_in_the_ball():
    model = _Linear()
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    aa = make_autoattack(model, norm="Linf", eps=0.05, device="cpu", version="custom", attacks=["apgd-ce"], n_iter=5)
    steps = []
    x_adv = run_autoattack(aa, x, y, batch_size=8, callback=lambda done, total, _: steps.append((done, total)))
    assert float((x_adv - x).abs().max()) <= 0.05 + 1e-6
    assert steps[-1][0] == steps[-1][1] == 6  # one batch, one restart, n_iter + 1 gradient calls


def test_norm_names_are_accepted_in_both_spellings():
    assert canonical_norm("L2") == canonical_norm("l2") == "l2"
    assert PGDConfig(norm="Linf").norm == "linf"
    with pytest.raises(ValueError, match="norm"):
        PGDConfig(norm="l1")
