"""The one wrapper around pyautoattack (Croce & Hein, ICML 2020; PyPI `pyautoattack`).

Any classifier x ↦ logits (an nn.Module on [0, 1] images) can be attacked: the 2AFC decision
(encoder/evaluate.py) and nearest-neighbour retrieval (retrieval/attacks/autoattack.py) are such
classifiers. Two things every caller needs are done here once:

* APGD derives its step-size checkpoints (n_iter_2 = 0.22·n_iter, n_iter_min = 0.06·n_iter,
  size_decr = 0.03·n_iter) from n_iter in its constructor; changing n_iter afterwards must reset
  them, or the schedule stays the one made for the constructor's 100 iterations (`set_iterations`).
* pyautoattack reseeds torch's global generator (`torch.random.manual_seed(seed)` in APGD/FAB);
  every run here happens inside `torch.random.fork_rng`, so the caller's random state is untouched.
  Its log messages are left to the logging configuration (its `verbose` follows this module's
  logger at DEBUG); no other library's logger level is changed.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Sequence

import torch
from torch import nn

from .pgd import canonical_norm

__all__ = ["autoattack_norm", "set_iterations", "make_autoattack", "run_autoattack", "apgd_targeted",
           "isolated_rng"]

log = logging.getLogger(__name__)


def autoattack_norm(norm: str) -> str:
    """pyautoattack's spelling ("L2" / "Linf") of a norm given in either spelling."""
    return {"l2": "L2", "linf": "Linf"}[canonical_norm(norm)]


def set_iterations(apgd, n_iter: int) -> None:
    """Set an APGD attack's iterations together with the checkpoint schedule its constructor derives."""
    apgd.n_iter = apgd.n_iter_orig = int(n_iter)
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


@contextlib.contextmanager
def isolated_rng(device: torch.device | str | None = None):
    """Random-state changes inside (pyautoattack's reseeding) are undone on exit, CPU and CUDA."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield


def make_autoattack(model: nn.Module, *, norm: str, eps: float, device, version: str = "standard",
                    attacks: Sequence[str] | None = None, seed: int = 0, n_iter: int | None = None,
                    n_restarts: int | None = None, n_target_classes: int | None = None,
                    num_classes: int | None = None):
    """A configured pyautoattack.AutoAttack.

    version "standard" runs APGD-CE, APGD-T, FAB-T, Square; "custom" runs `attacks` (one APGD restart
    unless `n_restarts` says otherwise: the constructor's 5 are meant for "plus"). `n_iter` replaces
    APGD's 100 iterations (untargeted and targeted, schedule included); target classes are capped at
    num_classes − 1 when the number of classes is given.
    """
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=autoattack_norm(norm), eps=eps, version=version,
                    attacks=list(attacks) if attacks else None, seed=seed, device=device)
    aa.verbose = log.isEnabledFor(logging.DEBUG)
    if n_target_classes is not None:
        aa.apgd_targeted.n_target_classes = n_target_classes
        aa.fab.n_target_classes = n_target_classes
    if n_restarts is not None:
        aa.apgd.n_restarts = n_restarts
    elif version == "custom":
        aa.apgd.n_restarts = 1
    if n_iter is not None:
        for apgd in (aa.apgd, aa.apgd_targeted):
            set_iterations(apgd, n_iter)
    if num_classes is not None:
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
    return aa


def _count_steps(aa, callback: Callable[[int, int, float], None], n: int, batch_size: int) -> int:
    """Report APGD's gradient evaluations through `callback` (APGD calls the model with gradients
    enabled once per iteration). Returns the budget, which assumes every input survives every attack."""
    batches = -(-n // batch_size)
    per = {"apgd-ce": aa.apgd.n_restarts, "apgd-dlr": aa.apgd.n_restarts,
           "apgd-t": aa.apgd_targeted.n_target_classes * aa.apgd_targeted.n_restarts}
    total = batches * sum(per.get(a, 0) * (aa.apgd.n_iter + 1) for a in aa.attacks_to_run)
    model, done = aa.model, [0]

    def counted(x):
        if torch.is_grad_enabled():
            done[0] += 1
            callback(min(done[0], total), total, math.nan)
        return model(x)

    for attack in (aa, aa.apgd, aa.apgd_targeted):
        attack.model = counted
    return total


def run_autoattack(aa, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128,
                   callback: Callable[[int, int, float], None] | None = None) -> torch.Tensor:
    """x_adv from `aa.run_standard_evaluation(x, y)`, the caller's random state untouched.

    x: (B, …) float in [0, 1]; y: (B,) the classes to move away from. `callback(done, total, nan)`
    counts APGD's gradient steps (may end early; FAB and Square are not counted).
    """
    x = x.detach().contiguous()  # pyautoattack reshapes with .view
    total = _count_steps(aa, callback, x.shape[0], batch_size) if callback is not None else 0
    with isolated_rng(x.device):
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    if callback is not None:
        callback(total, total, math.nan)
    return x_adv.detach()


def apgd_targeted(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, norm: str, eps: float,
                  n_iter: int = 100, n_restarts: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring class `target` (B,) to the top of `model`'s logits with AutoAttack's targeted APGD-DLR,
    the target fixed by the caller instead of cycling through the runners-up.

    Restarts attack only the inputs not yet successful. Returns (x_adv, success (B,) bool).
    """
    from pyautoattack.autopgd_base import APGDAttack_targeted

    x = x.detach().contiguous()
    apgd = APGDAttack_targeted(model, n_iter=n_iter, norm=autoattack_norm(norm), n_restarts=1, eps=eps,
                               seed=seed, device=x.device)
    apgd.logger = log
    apgd.init_hyperparam(x)
    with torch.no_grad():
        y = model(x).argmax(1)
    best = x.clone()
    done = y == target
    with isolated_rng(x.device):
        torch.manual_seed(seed)
        for _ in range(n_restarts):
            todo = (~done).nonzero().view(-1)
            if todo.numel() == 0:
                break
            apgd.y_target = target[todo]
            x_best, _, _, x_best_adv = apgd.attack_single_run(x[todo], y[todo])
            for cand in (x_best_adv, x_best):
                with torch.no_grad():
                    ok = model(cand).argmax(1) == target[todo]
                fresh = ok & ~done[todo]
                best[todo[fresh]] = cand[fresh].detach()
                done[todo[fresh]] = True
    return best, done
