"""The attack engine: PGD (ℓ2 / ℓ∞, random start, restarts) and the pyautoattack wrapper.

Attacks are objectives handed to this engine: the 2AFC attacks (encoder/evaluate.py) and the
ranking attacks (retrieval/attacks/) define what to minimise; this package searches the threat set.

    pgd.py         PGDConfig, pgd(x0, objective, config), projection and norms
    autoattack.py  pyautoattack configured once (iteration schedule, isolated random state)
"""
from .autoattack import apgd_targeted, autoattack_norm, isolated_rng, make_autoattack, run_autoattack, set_iterations
from .pgd import (ROBRANK_LINF, Callback, Objective, PGDConfig, PGDOutcome, canonical_norm, perturbation_norm, pgd,
                  project, random_start)

__all__ = [
    "PGDConfig", "PGDOutcome", "ROBRANK_LINF", "Callback", "Objective", "pgd", "project", "perturbation_norm",
    "random_start", "canonical_norm", "autoattack_norm", "set_iterations", "make_autoattack", "run_autoattack",
    "apgd_targeted", "isolated_rng",
]
