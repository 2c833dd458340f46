"""Robust deep metric learning: hardness manipulation with a linear gradual adversary and the
intra-class structure term, HM[S, g_LGA] + ICS (Zhou & Patel, "Enhancing Adversarial Robustness
for Deep Metric Learning", CVPR 2022, arXiv 2203.01439; code: github.com/cdluminate/robrank,
`robrank/defenses/amd.py` — `hm_training_step` and `MadryInnerMax.HardnessManipulate` —, the
miners in `robrank/losses/miner.py`, the margins in `robrank/configs/configs_loss.py` and the
attack budget in `robrank/configs/configs_rank.py`). The paper's best CUB/CARS/SOP configuration is
robrank's `rres18ghmetsmi:ptripletN` (escript/cub-hmi.sh): gradual (g), hardness manipulation (hm)
with the squared-hinge alignment (et), softhard source (s), semihard destination (m), ICS (i); a
triplet loss on L2-normalised embeddings with Euclidean distance ("N" metric).

Notation. e(x) is the encoder's unit-norm embedding; d(u, v) = ‖e(u) − e(v)‖₂ (robrank's N metric;
on the unit sphere the cosine distance is d²/2, so both rank alike); ξ = 0.2 the triplet margin.

* Batches (robrank's SPC-2): B/2 classes × 2 images, laid out [c₁, c₁, c₂, c₂, …]; anchors are the
  even positions.
* Hardness of a triplet:  H(a, p, n) = d(a, p) − d(a, n)  (`hardness`); the triplet loss is
  max(0, H + ξ) averaged over triplets (`triplet_loss`).
* Source triplets (softhard, `mine_softhard`): for anchor a, a negative drawn uniformly among
  the negatives closer than a's farthest positive, and a positive drawn among the positives
  farther than a's closest negative (each falling back to any negative / positive).
  Destination triplets (semihard, `mine_semihard`): a's pair partner as positive and a negative
  with d(a, p) < d(a, n) < d(a, p) + ξ (fallback: any negative).
* Hardness manipulation (`manipulate_hardness`): PGD (ℓ∞, ε = 8/255, α = 1/255, 32 steps — robrank's
  rob224 training profile) on the three images of every source triplet, minimising
      ℓ_HM(ã, p̃, ñ) = max(0, H_D − H(ã, p̃, ñ))²                                  (`hm_loss`)
  (robrank's "ET" alignment) inside {‖x̃ − x‖∞ ≤ ε} ∩ [0, 1], with the model in eval mode. It raises
  the source hardness up to the destination hardness H_D and no further (at and beyond H_D the
  objective and its gradient are 0). The engine is encoder.attack.pgd (it keeps each triplet's
  best iterate; robrank keeps the last one and stops when the mean objective stops changing).
* Linear gradual adversary (`lga_destination`): the destination is not a mined triplet but the
  pseudo-hardness
      H_D = g_LGA(ℓ_{t−1}) = −ξ · Π_[0,ξ](ℓ_{t−1}) / ξ = −min(max(ℓ_{t−1}, 0), ξ)
  where ℓ_{t−1} is the previous step's adversarial triplet loss (initially 2.0): while the model
  is weak (ℓ ≥ ξ) the adversary only asks for H = −ξ (a triplet that just satisfies the margin);
  as ℓ → 0 it asks for H → 0 (d(a, p) = d(a, n)). This is robrank's code (amd.py, `_G = 4`, "pure
  GA (semihard)": destH = −0.2·nrmloss with nrmloss = clamp(prev_loss, 0, ul)/ul, ul = margin
  0.2). The paper's typeset formula could not be retrieved here (only its abstract was available
  offline); robrank's source, which produced the paper's tables, is followed as written. With the
  gradual adversary on, the semihard destination triplets are not used (as in robrank); they are
  the destination when `gradual=False` (H_D = their benign hardness, anchor by anchor).
* Intra-class structure (`ics_loss`), weight λ = 0.5: with a, p the benign anchor and positive
  (embedded in train mode, with gradient) and ã the adversarial anchor,
      ℓ_ICS = mean over triplets of max(0, d(a, ã) − d(a, p))
  (robrank: `lossfunc.raw(ap_orig[anc], pnemb[anc], ap_orig[pos], override_margin=0.0)`).
* Training loss:  L = mean max(0, H(ã, p̃, ñ) + ξ) + λ·ℓ_ICS, on the adversarial triplets only
  (robrank computes the benign loss for logging only). `adversary=False` gives the undefended
  reference run: L = the triplet loss on the benign source triplets.

Classes (`RegionClasses`, `FolderClasses`): offline, a class is one region of a photo and its
near-duplicates, exactly the near-duplicate benchmark's labels (encoder.data.regions; view 1 the
clean region, view 2 an edited copy); for GPU users, a labelled folder `class/image.jpg` (CUB-200,
CARS-196, SOP laid out so), views = random resized crop + flip.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..attack import PGDConfig, pgd
from ..data.augment import random_resized_crop, uniform
from ..data.folder import list_images, load_image
from ..data.regions import crop_region, edit_region, regions
from ..io import atomic_write_text
from ..preprocess import pil_to_tensor
from ._config import ConfigMixin
from ._loop import Dist, Embed, item_generator, step_generator, train_encoder
from .schedules import cosine_with_warmup

__all__ = ["RobDMLConfig", "RegionClasses", "FolderClasses", "pairwise_distances", "hardness", "triplet_loss",
           "hm_loss", "lga_destination", "ics_loss", "mine_softhard", "mine_semihard", "mine_random", "MINERS",
           "manipulate_hardness", "spc2_batch", "train_robdml"]

log = logging.getLogger(__name__)

Miner = Literal["softhard", "semihard", "random"]


@dataclass(frozen=True)
class RobDMLConfig(ConfigMixin):
    """HM[S, g_LGA] + ICS training (module doc); defaults are the paper's except steps, batch and lr."""

    steps: int = 400  # optimiser steps
    batch_size: int = 64  # images per step: batch_size/2 classes × 2 images (SPC-2)
    lr: float = 5e-4  # AdamW base learning rate (robrank: Adam 1e-5 over 150 epochs of CUB)
    weight_decay: float = 4e-4  # robrank's
    warmup_steps: int = 20  # linear warm-up before the cosine decay
    margin: float = 0.2  # ξ: triplet margin, and the cap of the gradual adversary
    adversary: bool = True  # False: plain triplet training on the source triplets (the undefended run)
    eps: float = 8 / 255  # ℓ∞ budget of the hardness manipulation, [0,1] pixel units
    pgd_step: float = 1 / 255  # PGD step α (robrank rob224: 1/255)
    pgd_steps: int = 32  # PGD iterations (robrank: 32)
    source: Miner = "softhard"  # source triplets
    destination: Miner = "semihard"  # destination triplets (used only without the gradual adversary)
    gradual: bool = True  # H_D = g_LGA(previous loss) instead of the destination triplets' hardness
    ics_weight: float = 0.5  # λ of the intra-class structure term (0: off)
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"

    def __post_init__(self):
        if self.batch_size < 4 or self.batch_size % 2:
            raise ValueError("batch_size must be even and ≥ 4 (two images per class, at least two classes)")
        for name in ("source", "destination"):
            if getattr(self, name) not in MINERS:
                raise ValueError(f"{name} must be one of {', '.join(MINERS)}")
        if self.eps < 0 or self.pgd_steps < 0 or self.margin <= 0:
            raise ValueError("eps and pgd_steps must be ≥ 0 and the margin > 0")

    def pgd_config(self) -> PGDConfig:
        return PGDConfig(norm="linf", eps=self.eps, step=self.pgd_step, steps=self.pgd_steps, stop_at=0.0)


# Losses (pure functions of unit-norm embeddings) ------------------------------------------------
def pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances ‖z_i − z_j‖ of unit-norm rows, from the Gram matrix: √max(0, 2 − 2⟨z_i, z_j⟩)."""
    return (2 - 2 * (z @ z.T)).clamp_min(0).sqrt()


def hardness(ea: torch.Tensor, ep: torch.Tensor, en: torch.Tensor) -> torch.Tensor:
    """H = ‖e_a − e_p‖ − ‖e_a − e_n‖ per triplet, shape (T,)."""
    return (ea - ep).norm(dim=1) - (ea - en).norm(dim=1)


def triplet_loss(ea: torch.Tensor, ep: torch.Tensor, en: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over triplets of max(0, H(a, p, n) + margin)."""
    return (hardness(ea, ep, en) + margin).clamp_min(0).mean()


def hm_loss(h_source: torch.Tensor, h_destination: torch.Tensor | float) -> torch.Tensor:
    """Per-triplet hardness-manipulation objective max(0, H_D − H_S)², shape (T,)."""
    return (h_destination - h_source).clamp_min(0).square()


def lga_destination(previous_loss: float, margin: float) -> float:
    """g_LGA: H_D = −margin · clamp(ℓ_{t−1}, 0, margin)/margin = −min(max(ℓ_{t−1}, 0), margin)."""
    return -margin * min(max(previous_loss, 0.0), margin) / margin


def ics_loss(anchor: torch.Tensor, adv_anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """mean over triplets of max(0, ‖e_a − e_ã‖ − ‖e_a − e_p‖) (benign a, p; adversarial ã)."""
    return ((anchor - adv_anchor).norm(dim=1) - (anchor - positive).norm(dim=1)).clamp_min(0).mean()


# Miners on SPC-2 batches -----------------------------------------------------------------------
def _pick(mask: torch.Tensor, fallback: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per row, a uniformly random column where `mask` holds (where no column does: where `fallback` does)."""
    use = torch.where(mask.any(1, keepdim=True), mask, fallback)
    if not bool(use.any(1).all()):
        raise ValueError("an anchor has no candidate (the batch needs two classes and two images per class)")
    scores = torch.rand(use.shape, generator=g).masked_fill(~use.cpu(), -1.0)
    return scores.argmax(1).to(mask.device)


def _masks(labels: torch.Tensor):
    n = labels.numel()
    anchors = torch.arange(0, n, 2, device=labels.device)
    same = labels[anchors, None] == labels[None, :]
    same[torch.arange(anchors.numel()), anchors] = False  # never the anchor itself as its positive
    return anchors, same, labels[anchors, None] != labels[None, :]


def mine_softhard(z: torch.Tensor, labels: torch.Tensor, g: torch.Generator, margin: float = 0.2):
    """robrank's spc2-softhard: negatives closer than the farthest positive, positives farther than
    the closest negative (uniform among them; else any negative / positive). Returns (anc, pos, neg)."""
    anchors, pos_mask, neg_mask = _masks(labels)
    dist = pairwise_distances(z.detach())[anchors]
    far_pos = dist.masked_fill(~pos_mask, -1.0).amax(1, keepdim=True)
    near_neg = dist.masked_fill(~neg_mask, float("inf")).amin(1, keepdim=True)
    neg = _pick(neg_mask & (dist < far_pos), neg_mask, g)
    pos = _pick(pos_mask & (dist > near_neg), pos_mask, g)
    return anchors, pos, neg


def mine_semihard(z: torch.Tensor, labels: torch.Tensor, g: torch.Generator, margin: float = 0.2):
    """robrank's spc2-semihard: positive = the pair partner (anchor + 1), negative uniform among
    d(a, p) < d(a, n) < d(a, p) + margin (else any negative)."""
    anchors, _, neg_mask = _masks(labels)
    dist = pairwise_distances(z.detach())[anchors]
    pos = anchors + 1
    d_ap = dist.gather(1, pos[:, None])
    neg = _pick(neg_mask & (d_ap < dist) & (d_ap - dist + margin > 0), neg_mask, g)
    return anchors, pos, neg


def mine_random(z: torch.Tensor, labels: torch.Tensor, g: torch.Generator, margin: float = 0.2):
    """robrank's spc2-random: positive = the pair partner, negative uniform among the negatives."""
    anchors, _, neg_mask = _masks(labels)
    return anchors, anchors + 1, _pick(neg_mask, neg_mask, g)


MINERS = {"softhard": mine_softhard, "semihard": mine_semihard, "random": mine_random}


# Hardness manipulation -----------------------------------------------------------------------------
def manipulate_hardness(embed, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                        h_destination: torch.Tensor | float, config: PGDConfig):
    """PGD on the images of T triplets ((T, C, H, W) each, in [0, 1]) minimising
    max(0, H_D − H(ã, p̃, ñ))² per triplet inside the ℓ∞/ℓ2 ball of `config` ∩ [0, 1].

    `embed` maps (N, C, H, W) → unit-norm (N, D) (the model in eval mode). Triplets whose benign
    objective is already 0 are not attacked (their gradient is 0: PGD would leave them in place).
    Returns (ã, p̃, ñ, per-triplet objective after, per-triplet objective before).
    """
    t = anchor.shape[0]
    x0 = torch.stack([anchor, positive, negative], 1)  # (T, 3, C, H, W)
    h_dst = torch.as_tensor(h_destination, dtype=anchor.dtype, device=anchor.device).expand(t)

    def objective_of(rows):
        def objective(x):
            e = embed(x.flatten(0, 1)).view(x.shape[0], 3, -1)
            return hm_loss(hardness(e[:, 0], e[:, 1], e[:, 2]), h_dst[rows])
        return objective

    with torch.no_grad():
        before = objective_of(slice(None))(x0).detach().float()
    x_adv = x0.clone()
    after = before.clone()
    todo = torch.nonzero(before > 0).view(-1)
    if todo.numel():
        out = pgd(x0[todo], objective_of(todo), config)
        x_adv[todo] = out.x_adv
        after[todo] = out.loss
    return x_adv[:, 0], x_adv[:, 1], x_adv[:, 2], after, before


# Classes ---------------------------------------------------------------------------------------------
class RegionClasses:
    """Classes = regions of photos (encoder.data.regions, the near-duplicate benchmark's labels):
    `regions_per_photo` regions per photo (IoU < max_iou); a pair = (the clean region, an edited copy).

    photos: PIL images (or (3, H, W) tensors in [0, 1]); regions are drawn with NumPy generator
    [seed, photo index], edits with [seed, step, position] (`pair`).
    """

    def __init__(self, photos, size: int, regions_per_photo: int = 36, seed: int = 0, max_iou: float = 0.25):
        from ..image import to_pil

        self.size = size
        self.photos = [p.convert("RGB") if isinstance(p, Image.Image) else to_pil(p).convert("RGB") for p in photos]
        self.boxes: list[tuple[int, tuple]] = []
        for i, photo in enumerate(self.photos):
            rng = np.random.default_rng([seed, i])
            self.boxes.extend((i, box) for box in regions(photo.width, photo.height, regions_per_photo, rng, max_iou))
        if len(self.boxes) < 2:
            raise ValueError("fewer than two regions: give larger or more photos")

    def __len__(self) -> int:
        return len(self.boxes)

    def pair(self, cls: int, seed: int, step: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, box = self.boxes[cls]
        clean = crop_region(self.photos[i], box, self.size)
        edited, _ = edit_region(self.photos[i], box, self.size, np.random.default_rng([seed, step, position]))
        return pil_to_tensor(clean), pil_to_tensor(edited)


class FolderClasses:
    """Classes = the sub-folders of `root` (`class/image.jpg`, CUB-200's layout); a pair = two images
    of the class (one image: twice the same), each a random resized crop (area `crop_scale`) flipped
    with p = ½ — robrank's training transform."""

    def __init__(self, root: str | os.PathLike, size: int, crop_scale=(0.2, 1.0), cache: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"labelled folder not found: {root}")
        self.size, self.crop_scale, self.cache = size, tuple(crop_scale), cache
        self.names: list[str] = []
        self.files: list[list[Path]] = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            files = list_images(d)
            if files:
                self.names.append(d.name)
                self.files.append(files)
        if len(self.files) < 2:
            raise ValueError(f"{root}: need at least two class sub-folders with images (class/image.jpg)")
        self._decoded: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, path: Path) -> torch.Tensor:
        if not self.cache:
            return load_image(path)
        if path not in self._decoded:
            self._decoded[path] = load_image(path)
        return self._decoded[path]

    def pair(self, cls: int, seed: int, step: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = item_generator(seed, step, position)
        files = self.files[cls]
        first = int(torch.randint(len(files), (1,), generator=g))
        second = first if len(files) == 1 else (first + 1 + int(torch.randint(len(files) - 1, (1,), generator=g))) \
            % len(files)
        views = []
        for idx in (first, second):
            v = random_resized_crop(self._image(files[idx]), self.size, g, scale=self.crop_scale)
            views.append(v.flip(-1) if uniform(g) < 0.5 else v)
        return views[0], views[1]


def spc2_batch(classes, seed: int, step: int, batch_size: int, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s SPC-2 batch restricted to pair `positions`: images (2P, 3, S, S) laid out
    [c₁, c₁, c₂, c₂, …] and their class labels. The batch_size/2 classes are distinct when there
    are enough (a seeded permutation), else drawn with replacement."""
    pairs = batch_size // 2
    g = step_generator(seed, step)
    n = len(classes)
    chosen = torch.randperm(n, generator=g)[:pairs] if n >= pairs else torch.randint(n, (pairs,), generator=g)
    images, labels = [], []
    for pos in positions:
        cls = int(chosen[pos])
        images.extend(classes.pair(cls, seed, step, pos))
        labels.extend((cls, cls))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


# Training -----------------------------------------------------------------------------------------------
def _lga_path(run_dir) -> Path | None:
    return Path(run_dir) / "lga.json" if run_dir else None


def train_robdml(encoder, classes, config: RobDMLConfig = RobDMLConfig(), run_dir: str | os.PathLike | None = None,
                 progress: bool = True, stop_after: int | None = None, dist: Dist | None = None) -> dict:
    """Train `encoder` (a StandardEncoder, in place) with HM[S, g_LGA] + ICS on `classes` (module doc).

    Resumable from run_dir: besides the shared training state, `lga.json` keeps every step's
    adversarial loss so that a resumed run's gradual adversary reads the exact ℓ_{t−1}.
    Returns `train_encoder`'s record plus "trace": per step {step, loss, triplet, ics, h_destination,
    attacked (triplets PGD moved), hm_before, hm_after (mean objective)}.
    """
    lga_file = _lga_path(run_dir)
    previous: dict[str, float] = {}
    if lga_file is not None and lga_file.is_file():
        previous = json.loads(lga_file.read_text())
    trace: list[dict] = []
    pgd_config = config.pgd_config()
    source, destination = MINERS[config.source], MINERS[config.destination]

    def make_step(model, first_step: int, dist: Dist):
        def embed_eval(x):
            return encoder._embed(x)

        def step_fn(step: int):
            positions = list(dist.positions(config.batch_size // 2))
            images, labels = spc2_batch(classes, config.seed, step, config.batch_size, positions)
            images, labels = images.to(dist.device), labels.to(dist.device)
            g = step_generator(config.seed, step, salt=7)
            encoder.eval()
            with torch.no_grad():
                z = encoder._embed(images)
            anc, pos, neg = source(z, labels, g, config.margin)
            record = {"step": step}
            if config.adversary:
                if config.gradual:
                    prev = previous.get(str(step - 1), 2.0)  # robrank starts from 2.0
                    h_dst: torch.Tensor | float = lga_destination(prev, config.margin)
                    record["h_destination"] = h_dst
                else:
                    da, dp, dn = destination(z, labels, g, config.margin)
                    h_dst = hardness(z[da], z[dp], z[dn])
                    record["h_destination"] = float(h_dst.mean())
                xa, xp, xn, after, before = manipulate_hardness(embed_eval, images[anc], images[pos], images[neg],
                                                                h_dst, pgd_config)
                record.update(attacked=int((before > 0).sum()), hm_before=float(before.mean()),
                              hm_after=float(after.mean()))
            else:
                xa, xp, xn = images[anc], images[pos], images[neg]
            encoder.train()
            t = anc.numel()
            use_ics = config.adversary and config.ics_weight > 0
            batch = torch.cat([xa, xp, xn] + ([images[anc], images[pos]] if use_ics else []))
            e = model(batch)
            trip = triplet_loss(e[:t], e[t:2 * t], e[2 * t:3 * t], config.margin)
            loss = trip
            if use_ics:
                ics = ics_loss(e[3 * t:4 * t], e[:t], e[4 * t:5 * t])
                loss = trip + config.ics_weight * ics
                record["ics"] = float(ics.detach())
            record.update(loss=float(loss.detach()), triplet=float(trip.detach()))
            previous[str(step)] = float(trip.detach())
            if lga_file is not None and dist.main:
                atomic_write_text(lga_file, json.dumps(previous))
            trace.append(record)
            return loss, batch.shape[0]

        return step_fn

    rec = {"stage": "robdml", "robdml": config.to_dict(), "model": json.loads(encoder.config.to_json()),
           "classes": len(classes)}
    result = train_encoder(
        encoder, Embed(encoder),
        lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
        config, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps), rec, make_step,
        run_dir=run_dir, dist=dist, progress=progress, stop_after=stop_after, desc="robdml")
    result["trace"] = trace
    return result
