"""Stage 1 of LipSim (Ghazanfari et al., ICLR 2024, §4): distil a teacher's embeddings into the
1-Lipschitz student on an image folder.

Per image, two views v1, v2 (LipSim: random resized crop + flip, plus colour jitter and grayscale;
or, with `view2="edit"`, v2 = everyday edits of v1: JPEG, blur, noise, colour, shift, rescale). The
teacher embeds v1 only; with x(v) the student's D kept coordinates (before the constant 1 and the
normalisation) and t the teacher's unit-norm embedding,

    loss = ½ [ RMSE(x(v1), c·t(v1)) + RMSE(x(v2), c·t(v1)) ],   RMSE(a, b) = sqrt(mean((a − b)²)).

Optional retrieval term (`retrieval_weight` λ > 0; ours, not the paper's): with e(v) the student's
unit-norm embedding and S_ij = ⟨e(v2_i), e(v1_j)⟩ over the batch (v2_i queries a gallery of v1's),

    loss += λ · mean_i max(0, m − (S_ii − max_{j : image_j ≠ image_i} S_ij))

(rows whose batch holds no other image add 0). Why a margin: for a query q with ‖δ‖ ≤ ε and an
L-Lipschitz e, |⟨e(q+δ), g⟩ − ⟨e(q), g⟩| ≤ Lε‖g‖ for every gallery item g, so the gap S_ii − S_ij
shrinks by at most Lε‖e(v1_i) − e(v1_j)‖ ≤ 2Lε and the top-1 is certified while ε < (S_ii − S_ij)/(2L):
a margin m in cosine similarity is a certified radius of at least m/(2L) on the training crops.
Distillation alone leaves the student using a small part of the separation its bound allows; the
hinge pushes distinct crops apart. `flip_p` mirrors v2 left–right with that probability
(view2="edit"), so that a mirrored copy is asked to embed like the original.

Why the un-normalised coordinates: the student's embedding is e = [x, 1]/‖[x, 1]‖ (the constant
makes the normalisation 1-Lipschitz; see encoder/lipsim.py). If x ≈ c·t then
    d_student(a, b) = 1 − ⟨e_a, e_b⟩ ≈ c²/(1 + c²) · d_teacher(a, b),
so the student ranks like the teacher, with distances shrunk by c²/(1+c²) (½ at c = 1, the
paper's setting, whose student output is matched to the teacher's embedding directly). Matching the
normalised e instead would push ‖x‖ → ∞, which a 1-Lipschitz map of bounded images cannot do.
A larger c (`target_scale`) spreads the embeddings further apart and so enlarges margins and
certified radii, as long as the 1-Lipschitz student can follow.

Teachers: any Encoder (DreamSim, the standard CNN, …; its embedding dimension must equal the
student's embed_dim D), or a file of precomputed teacher embeddings (`compute_teacher_embeddings`):
the teacher then runs once per image, on a fixed view (central square crop), and v1 is that fixed view.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.augment import center_view, lipsim_view, random_edit, uniform
from ..data.folder import ImageFolder
from ..io import load_tensors, read_header, save_tensors
from ..lipsim import LipSimEncoder
from ..preprocess import resize
from ._config import ConfigMixin
from ._loop import Dist, item_generator, step_loader, train_encoder
from .schedules import cosine_with_warmup

__all__ = ["DistillConfig", "EncoderTeacher", "PrecomputedTeacher", "center_view", "compute_teacher_embeddings",
           "distill", "retrieval_margin_loss"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig(ConfigMixin):
    """Distillation hyper-parameters (defaults: the LipSim paper's optimiser)."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # images per step (global, over all ranks)
    lr: float = 0.01  # Adam base learning rate (LipSim: 0.01)
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas (LipSim: 0.5, 0.9)
    weight_decay: float = 0.0  # Adam (L2) weight decay
    warmup_steps: int = 50  # linear warm-up before the cosine decay
    min_lr_ratio: float = 0.0  # cosine decays to base lr × this
    target_scale: float = 1.0  # c: the student's D coordinates are matched to c·t (see module doc)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the random resized crops
    jitter_p: float = 0.8  # probability of colour jitter per view
    gray_p: float = 0.2  # probability of grayscale per view
    view2: str = "crop"  # "crop": independent second LipSim view (paper); "edit": everyday edits of v1
    edit_strength: float = 1.0  # view2="edit": maximum strength of each edit (0..1)
    flip_p: float = 0.0  # view2="edit": probability that v2 is also mirrored left-right
    retrieval_weight: float = 0.0  # λ of the retrieval margin term (module doc); 0 = the paper's loss
    retrieval_margin: float = 0.2  # m of the retrieval margin term, in cosine similarity
    seed: int = 0  # all randomness derives from (seed, step, item)
    checkpoint_every: int = 100  # steps between resumable training-state saves
    device: str = "auto"  # "auto" (CUDA when available, per LOCAL_RANK), "cpu", "cuda:0", …

    def __post_init__(self):
        if self.view2 not in ("crop", "edit"):
            raise ValueError(f"view2 must be 'crop' or 'edit', got {self.view2!r}")


class EncoderTeacher:
    """A live teacher: any Encoder, run on view 1 resized to its own input size (no gradients)."""

    fixed_view = False

    def __init__(self, encoder):
        self.encoder = encoder.eval() if hasattr(encoder, "eval") else encoder
        self.dim = encoder.dim
        self.name = encoder.name

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, indices: list[int]) -> torch.Tensor:
        x = views if views.shape[-1] == self.encoder.input_size else resize(views, self.encoder.input_size)
        return self.encoder.embed(x).float()


TEACHER_FORMAT = "robret-teacher-embeddings"
TEACHER_VERSION = "1"


def _upgrade_teacher_header(meta: dict) -> dict:
    """Files written before the header had a version: {format, teacher, paths} → version 1."""
    if meta.get("format") == TEACHER_FORMAT and "version" not in meta and "paths" in meta:
        config = {"teacher": meta.get("teacher", "?"), "paths": json.loads(meta["paths"])}
        return {"format": TEACHER_FORMAT, "version": TEACHER_VERSION, "config": json.dumps(config)}
    return meta


class PrecomputedTeacher:
    """Teacher embeddings read from a file written by `compute_teacher_embeddings` (one per image)."""

    fixed_view = True

    def __init__(self, path: str | os.PathLike, folder: ImageFolder | None = None):
        meta = read_header(path, TEACHER_FORMAT, TEACHER_VERSION, "teacher-embedding file",
                           upgrade=_upgrade_teacher_header)
        self.embeddings = load_tensors(path)["embeddings"].float()
        self.paths = list(meta["config"]["paths"])
        self.name = f"precomputed:{meta['config'].get('teacher', '?')}"
        self.dim = self.embeddings.shape[1]
        if folder is not None and folder.relpaths() != self.paths:
            raise ValueError(f"{path} was computed for a different list of images than {folder.root}")

    def __call__(self, views: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return self.embeddings[indices].to(views.device)


@torch.no_grad()
def compute_teacher_embeddings(encoder, folder: ImageFolder, path: str | os.PathLike, batch_size: int = 64) -> Path:
    """Run `encoder` once over every image's central square crop; write the (N, D) embeddings with
    config {teacher: name, paths: relative image paths} (encoder.io's tensor format, atomically)."""
    out = []
    for start in range(0, len(folder), batch_size):
        views = torch.stack([center_view(folder[i], encoder.input_size)
                             for i in range(start, min(len(folder), start + batch_size))])
        out.append(encoder.embed(views).float().cpu())
    return save_tensors(path, {"embeddings": torch.cat(out)}, TEACHER_FORMAT, TEACHER_VERSION,
                        {"teacher": encoder.name, "paths": folder.relpaths()})


class _Views(torch.utils.data.Dataset):
    """Key (step, position, index) → (v1, v2, index): the two views of one image of one step."""

    def __init__(self, images, size: int, config: DistillConfig, fixed_view: bool):
        self.images, self.size, self.config, self.fixed_view = images, size, config, fixed_view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        step, pos, index = key
        c = self.config
        g = item_generator(c.seed, step, pos)
        img = self.images[index]
        if self.fixed_view:
            v1 = center_view(img, self.size)
        else:
            v1 = lipsim_view(img, self.size, g, scale=c.crop_scale, jitter_p=c.jitter_p, gray_p=c.gray_p)
        if c.view2 == "crop":
            v2 = lipsim_view(img, self.size, g, scale=c.crop_scale, jitter_p=c.jitter_p, gray_p=c.gray_p)
        else:
            v2 = random_edit(v1, g, max_strength=c.edit_strength)
            if c.flip_p > 0 and uniform(g) < c.flip_p:
                v2 = v2.flip(-1)
        return v1, v2, index


class _Features(nn.Module):
    """forward = the student's D kept coordinates (what DDP wraps)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)[:, : self.net.config.embed_dim]


def _rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean().sqrt()


def retrieval_margin_loss(x1: torch.Tensor, x2: torch.Tensor, images: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_i max(0, m − (S_ii − max_{j: images_j ≠ images_i} S_ij)), S_ij = ⟨e(x2_i), e(x1_j)⟩, where
    e(x) = [x, 1]/‖[x, 1]‖ is the embedding of the student's kept coordinates x (module doc)."""
    def unit(x):
        f = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return f / f.norm(dim=1, keepdim=True)

    s = unit(x2) @ unit(x1).T
    other = images[:, None] != images[None, :]
    # A row with no other image has negative = −inf, so gap = +inf and its hinge is 0 (gradient 0 too).
    negative = s.masked_fill(~other, float("-inf")).max(dim=1).values
    return (margin - (s.diagonal() - negative)).clamp(min=0).mean()


def distill(student: LipSimEncoder, teacher, images: ImageFolder, config: DistillConfig = DistillConfig(),
            run_dir: str | os.PathLike | None = None, progress: bool = True, stop_after: int | None = None,
            dist: Dist | None = None, workers: int = 0) -> dict:
    """Train `student` (in place) to match `teacher` on `images` (a dataset of float (3,H,W) images,
    e.g. ImageFolder); resumes from `run_dir` when it holds a state of the same configuration.
    Returns {"history", "steps", "images_per_second", "seconds", "final_loss"}. `stop_after` stops
    (and saves) after that many steps: a simulated interruption for tests. `workers` > 0 renders
    the views in that many loader processes (same results)."""
    D = student.config.embed_dim
    if teacher.dim != D:
        raise ValueError(f"teacher dimension {teacher.dim} != student embed_dim {D}: choose a LipSimConfig "
                         f"with embed_dim={teacher.dim}")
    views = _Views(images, student.input_size, config, teacher.fixed_view)

    def make_step(model, first_step: int, dist: Dist):
        batches = iter(step_loader(views, config.seed, len(images), config.batch_size, first_step, config.steps,
                                   dist, workers))

        def step_fn(step: int):
            v1, v2, idx = next(batches)
            v1, v2 = v1.to(dist.device), v2.to(dist.device)
            target = config.target_scale * teacher(v1, idx.tolist())
            x = model(torch.cat([v1, v2]))
            n = len(v1)
            loss = 0.5 * (_rmse(x[:n], target) + _rmse(x[n:], target))
            if config.retrieval_weight > 0:
                loss = loss + config.retrieval_weight * retrieval_margin_loss(x[:n], x[n:], idx.to(x.device),
                                                                              config.retrieval_margin)
            return loss, n

        return step_fn

    return train_encoder(
        student, _Features(student.net),
        lambda params: torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay),
        config, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps, config.min_lr_ratio),
        {"stage": "distill", "distill": config.to_dict(), "student": json.loads(student.config.to_json()),
         "teacher": teacher.name, "images": len(images)},
        make_step, run_dir=run_dir, dist=dist, progress=progress, stop_after=stop_after, desc="distill")
