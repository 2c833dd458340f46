"""Training of the standard CNN baseline: SimCLR's NT-Xent (Chen et al., ICML 2020) on photo crops.

Per image of the batch, a random resized crop c (flipped with p = ½); the two views are c after
1–2 independent everyday edits each (JPEG, blur, noise, colour, shift, rescale). With z the unit-norm
embeddings of all 2B views and τ the temperature,

    loss = mean over views i of  −log( exp(⟨z_i, z_i⁺⟩/τ) / Σ_{j≠i} exp(⟨z_i, z_j⟩/τ) ),

so edited copies of one crop embed together and different crops apart: a near-duplicate detector
with no Lipschitz bound. With `view_flip_p` > 0 each view is also mirrored on its own with that
probability, so that a mirrored copy counts as the same picture. Under DDP, negatives are those of the rank's own slice.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.augment import random_edit, random_resized_crop, uniform
from ..data.folder import ImageFolder
from ._config import ConfigMixin
from ._loop import Dist, Embed, batch_indices, item_generator, train_encoder
from .schedules import cosine_with_warmup

__all__ = ["ContrastiveConfig", "nt_xent", "train_contrastive"]


@dataclass(frozen=True)
class ContrastiveConfig(ConfigMixin):
    """Hyper-parameters of the contrastive baseline training."""

    steps: int = 500  # optimiser steps
    batch_size: int = 64  # crops per step (two views each)
    lr: float = 2e-3  # AdamW base learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 25  # linear warm-up before the cosine decay
    temperature: float = 0.2  # τ of NT-Xent
    crop_scale: tuple[float, float] = (0.1, 1.0)  # area fraction of the crops
    edit_strength: float = 1.0  # maximum strength of each edit
    view_flip_p: float = 0.0  # probability that each view is also mirrored on its own (0: views share the flip)
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of unit-norm (B, D) views: z1[i] and z2[i] are positives, all others negatives."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def train_contrastive(encoder, images: ImageFolder, config: ContrastiveConfig = ContrastiveConfig(),
                      run_dir: str | os.PathLike | None = None, progress: bool = True,
                      stop_after: int | None = None, dist: Dist | None = None) -> dict:
    """Train `encoder` (a StandardEncoder, in place) with NT-Xent on `images`. Resumable from run_dir;
    returns `train_encoder`'s record."""
    size = encoder.input_size

    def make_step(model, first_step: int, dist: Dist):
        def step_fn(step: int):
            idx = batch_indices(config.seed, step, len(images), config.batch_size)
            mine = list(dist.positions(config.batch_size))
            v1s, v2s = [], []
            for pos in mine:
                g = item_generator(config.seed, step, pos)
                c = random_resized_crop(images[idx[pos]], size, g, scale=config.crop_scale)
                if uniform(g) < 0.5:
                    c = c.flip(-1)
                for views in (v1s, v2s):
                    v = random_edit(c, g, max_strength=config.edit_strength)
                    if config.view_flip_p > 0 and uniform(g) < config.view_flip_p:
                        v = v.flip(-1)
                    views.append(v)
            n = len(mine)
            z = model(torch.cat([torch.stack(v1s), torch.stack(v2s)]).to(dist.device))
            return nt_xent(z[:n], z[n:], config.temperature), 2 * n

        return step_fn

    return train_encoder(
        encoder, Embed(encoder), lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
        config, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps),
        {"stage": "contrastive", "contrastive": config.to_dict(), "model": json.loads(encoder.config.to_json()),
         "images": len(images)},
        make_step, run_dir=run_dir, dist=dist, progress=progress, stop_after=stop_after, desc="standard")
