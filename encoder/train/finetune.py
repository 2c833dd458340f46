"""Stage 2 of LipSim (Ghazanfari et al., ICLR 2024, §4; loss from DreamSim, Fu et al. 2023): fine-tune
on 2AFC triplets (NIGHTS layout) with a hinge loss.

For a triplet (x, x0, x1) with p = fraction of people who chose x1 (right_vote), d the encoder's
cosine distance 1 − ⟨e(·), e(·)⟩, and y' = 2·round(p) − 1 (+1 when people chose x1):

    loss = mean over the batch of  max(0, m − y'·(d(x, x0) − d(x, x1)))

i.e. the chosen image must be closer to the reference than the other by at least the margin m
(LipSim uses m ∈ {0.2, 0.4, 0.5}; larger margins give larger certified radii). DreamSim sums over
the batch; the mean differs by the constant batch size, which Adam's update is invariant to.
Learning rate: triangular (linear up to the peak, linear down to zero).
Works on any TorchEncoder whose parameters train (LipSim, the standard CNN).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data.augment import random_edit, uniform
from ..data.nights import NightsDataset
from ._config import ConfigMixin
from ._loop import Dist, Embed, item_generator, step_loader, train_encoder
from .schedules import triangular

__all__ = ["FinetuneConfig", "hinge_2afc_loss", "finetune"]


@dataclass(frozen=True)
class FinetuneConfig(ConfigMixin):
    """2AFC fine-tuning hyper-parameters."""

    steps: int = 500  # optimiser steps
    batch_size: int = 32  # triplets per step (global)
    lr: float = 1e-3  # peak learning rate of the triangular schedule
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas
    weight_decay: float = 0.0  # Adam (L2) weight decay
    margin: float = 0.5  # hinge margin m (LipSim: 0.2, 0.4 or 0.5)
    peak: float = 0.3  # fraction of the steps spent ramping up to the peak lr
    flip_p: float = 0.5  # probability of flipping a whole triplet horizontally
    edit_p: float = 0.0  # probability of an everyday edit of the reference (robustness augmentation)
    edit_strength: float = 0.5  # maximum strength of that edit
    seed: int = 0  # all randomness derives from (seed, step, item)
    checkpoint_every: int = 100  # steps between resumable training-state saves
    device: str = "auto"  # "auto", "cpu", "cuda:0", …


def hinge_2afc_loss(d0: torch.Tensor, d1: torch.Tensor, p: torch.Tensor, margin: float) -> torch.Tensor:
    """mean max(0, m − y'·(d0 − d1)) with y' = 2·round(p) − 1 (p = P(x1 chosen)). Shapes (B,)."""
    y = 2 * torch.round(p) - 1
    return torch.clamp(margin - y * (d0 - d1), min=0).mean()


class _Triplets(torch.utils.data.Dataset):
    """Key (step, position, index) → (ref, x0, x1, p), with the step's flip / edit augmentation."""

    def __init__(self, dataset: NightsDataset, config: FinetuneConfig):
        self.dataset, self.config = dataset, config

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        step, pos, index = key
        c = self.config
        g = item_generator(c.seed, step, pos)
        ref, x0, x1, p, _ = self.dataset[index]
        if uniform(g) < c.flip_p:
            ref, x0, x1 = ref.flip(-1), x0.flip(-1), x1.flip(-1)
        if c.edit_p > 0 and uniform(g) < c.edit_p:
            ref = random_edit(ref, g, max_strength=c.edit_strength, n_max=1)
        return ref, x0, x1, p


def finetune(encoder, dataset: NightsDataset, config: FinetuneConfig = FinetuneConfig(),
             run_dir: str | os.PathLike | None = None, progress: bool = True, stop_after: int | None = None,
             dist: Dist | None = None, workers: int = 0) -> dict:
    """Fine-tune `encoder` (in place) on the triplets of `dataset` (images at encoder.input_size).
    Resumable from `run_dir`; returns {"history", "steps", "images_per_second", "seconds", "final_loss"}.
    `workers` > 0 loads triplets in that many processes (same results)."""
    if dataset.size != encoder.input_size:
        raise ValueError(f"dataset images are {dataset.size} px, the encoder takes {encoder.input_size}")

    def make_step(model, first_step: int, dist: Dist):
        batches = iter(step_loader(_Triplets(dataset, config), config.seed, len(dataset), config.batch_size,
                                   first_step, config.steps, dist, workers))

        def step_fn(step: int):
            ref, x0, x1, p = next(batches)
            n = len(ref)
            e = model(torch.cat([ref, x0, x1]).to(dist.device))
            er, e0, e1 = e[:n], e[n:2 * n], e[2 * n:]
            d0, d1 = 1 - (er * e0).sum(1), 1 - (er * e1).sum(1)
            return hinge_2afc_loss(d0, d1, p.to(dist.device), config.margin), 3 * n

        return step_fn

    return train_encoder(
        encoder, Embed(encoder),
        lambda params: torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay),
        config, lambda s: triangular(s, config.steps, config.peak),
        {"stage": "finetune", "finetune": config.to_dict(), "encoder": encoder.name, "triplets": len(dataset)},
        make_step, run_dir=run_dir, dist=dist, progress=progress, stop_after=stop_after, desc="finetune")
