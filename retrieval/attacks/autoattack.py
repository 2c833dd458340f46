"""AutoAttack (Croce & Hein, ICML 2020; PyPI `pyautoattack`) on nearest-neighbour retrieval.

Retrieval over a candidate set G (N, D) is a classifier: x ↦ logits z_j = ⟨e(x), g_j⟩ / τ, whose
argmax is the top-1. With labels, a class is scored by its best item, z_c = max_{j ∈ c} s_j / τ, so
the argmax is the top-1's label (1-NN classification). AutoAttack's losses are scale-invariant
(DLR) or saturate only for huge logits (CE); τ = 0.05 keeps logit gaps ≤ 40 so that CE gradients
stay representable in float32.

  untargeted: y = the true class (or the clean top-1); success when the top-1 moves off it.
  targeted:   bring a chosen item (class) to the top: AutoAttack's targeted APGD-DLR with the target
              fixed by us instead of cycling through the runners-up.

This module holds only the classifier (the objective); running pyautoattack is encoder/attack's job.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from encoder.attack import apgd_targeted, make_autoattack, run_autoattack

from ._embed import ImageEmbedder, as_embedder, as_tensor

__all__ = ["NearestNeighbourClassifier", "autoattack_untargeted", "autoattack_targeted", "DEFAULT_TAU"]

DEFAULT_TAU = 0.05


class NearestNeighbourClassifier(nn.Module):
    """Nearest-neighbour search as a classifier: (B, 3, H, W) in [0, 1] → (B, C) logits s/τ.

    gallery: (N, D) unit-norm embeddings; labels: (N,) ints (classes = sorted unique labels, logit =
    best item of the class) or None (class j = item j).
    """

    def __init__(self, encoder, gallery, labels=None, tau: float = DEFAULT_TAU):
        super().__init__()
        self.embedder: ImageEmbedder = as_embedder(encoder)
        self.gallery = as_tensor(gallery, self.embedder.device)
        self.tau = float(tau)
        if labels is None:
            self.classes = None
            self.item_class = None
            self.num_classes = self.gallery.shape[0]
        else:
            lab = as_tensor(labels, self.embedder.device, None).long().view(-1)
            self.classes, self.item_class = torch.unique(lab, return_inverse=True)
            self.num_classes = int(self.classes.numel())

    def class_of(self, labels) -> torch.Tensor:
        """Class indices (logit columns) of label values."""
        lab = as_tensor(labels, self.embedder.device, None).long().view(-1)
        if self.classes is None:
            return lab
        pos = torch.searchsorted(self.classes, lab)
        if bool((pos >= self.num_classes).any()) or bool((self.classes[pos.clamp_max(self.num_classes - 1)] != lab).any()):
            raise ValueError("a label is not among the gallery's labels")
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.embedder(x) @ self.gallery.T / self.tau
        if self.item_class is None:
            return s
        out = torch.full((s.shape[0], self.num_classes), -1e4, dtype=s.dtype, device=s.device)
        idx = self.item_class[None, :].expand_as(s)
        return out.scatter_reduce(1, idx, s, reduce="amax", include_self=False)


def _prepare(encoder, images, gallery, labels, tau):
    model = NearestNeighbourClassifier(encoder, gallery, labels, tau).eval()
    x = as_tensor(images, model.embedder.device).detach()
    if model.num_classes < 4:
        raise ValueError("AutoAttack's DLR losses need at least 4 classes (gallery items or labels)")
    return model, x


def autoattack_untargeted(encoder, images, gallery, labels=None, gallery_labels=None, *, norm: str = "L2",
                          eps: float = 0.5, tau: float = DEFAULT_TAU, version: str = "standard",
                          attacks: Sequence[str] | None = None, n_target_classes: int | None = None,
                          n_iter: int | None = None, seed: int = 0, batch_size: int = 128,
                          callback: Callable[[int, int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the top-1 with pyautoattack.AutoAttack. Returns (x_adv, hit): hit = top-1 still right.

    labels: the queries' true labels (default: their clean top-1, i.e. "did the top-1 move");
    gallery_labels: the gallery's (default: one class per item). norm "L2"/"l2" or "Linf"/"linf".
    version "standard" runs APGD-CE, APGD-T, FAB-T, Square; pass version="custom" and `attacks`
    (e.g. ["apgd-ce", "apgd-t"]) for a cheaper run; `n_iter` overrides APGD's 100 iterations.
    `callback(done, total, nan)` counts APGD's gradient steps (encoder.attack.run_autoattack).
    """
    model, x = _prepare(encoder, images, gallery, gallery_labels, tau)
    with torch.no_grad():
        pred = model(x).argmax(1)
    if labels is None:
        y = pred
    elif gallery_labels is not None:
        y = model.class_of(labels)
    else:
        y = as_tensor(labels, x.device, None).long().view(-1)
    aa = make_autoattack(model, norm=norm, eps=eps, device=x.device, version=version, attacks=attacks, seed=seed,
                         n_iter=n_iter, n_target_classes=n_target_classes, num_classes=model.num_classes)
    x_adv = run_autoattack(aa, x, y, batch_size=batch_size, callback=callback)
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == y).float()
    return x_adv, hit


def autoattack_targeted(encoder, images, gallery, target, gallery_labels=None, *, norm: str = "L2",
                        eps: float = 0.5, tau: float = DEFAULT_TAU, n_iter: int = 100, n_restarts: int = 1,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring `target` (gallery index, or label when gallery_labels is given; one or per query) to the
    top with AutoAttack's targeted APGD-DLR (encoder.attack.apgd_targeted). Returns (x_adv, success)."""
    model, x = _prepare(encoder, images, gallery, gallery_labels, tau)
    t = model.class_of(target) if gallery_labels is not None else as_tensor(target, x.device, None).long().view(-1)
    t = t.expand(x.shape[0]).clone()
    best, done = apgd_targeted(model, x, t, norm=norm, eps=eps, n_iter=n_iter, n_restarts=n_restarts, seed=seed)
    return best, done.float()
