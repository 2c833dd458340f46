"""Shared training machinery: per-step randomness, resumable state, DDP, the step loop, progress,
and `train_encoder`, the skeleton every stage (distill, finetune, contrastive) runs in.

Randomness: every step draws from generators seeded by (seed, step) and every item from
(seed, step, position in the global batch), never from global RNG state, so a run interrupted at
any checkpoint and resumed produces the same weights as an uninterrupted one (tested bitwise on CPU).

Training state (`<run_dir>/state.safetensors` + `<run_dir>/state.json`): model tensors and optimizer
tensors in encoder.io's tensor format (header: the run's config and step), everything else (step,
config, optimizer hyper-parameters, loss history) in JSON; both written atomically. No pickle anywhere.

Multi-GPU / multi-node: launched by torchrun, the WORLD_SIZE/RANK/LOCAL_RANK variables are detected,
a process group is initialised (NCCL on GPUs, gloo on CPUs), the model is wrapped in
DistributedDataParallel and each rank renders and processes its slice of the global batch. Only
rank 0 writes files and shows progress.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..io import atomic_write_text, load_tensors, save_tensors

__all__ = ["Dist", "init_distributed", "step_generator", "item_generator", "batch_indices", "TrainLoop",
           "resolve_device", "StepBatches", "step_loader", "Embed", "train_encoder"]

log = logging.getLogger(__name__)

_MIX = 1_000_003
STATE_FORMAT, STATE_VERSION = "robret-train-state", "1"


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * _MIX + step) * 7919 + salt)


def item_generator(seed: int, step: int, position: int) -> torch.Generator:
    """Generator of one item of a step's global batch (same on every rank)."""
    return step_generator(seed, step, salt=1 + position)


def batch_indices(seed: int, step: int, n: int, batch: int) -> list[int]:
    """The global batch of step `step`: `batch` dataset indices drawn with replacement."""
    return torch.randint(n, (batch,), generator=step_generator(seed, step)).tolist()


class StepBatches:
    """Batch sampler: for each step in [start, stop), this rank's keys (step, position, dataset index).

    A dataset indexed by such keys renders an item as a pure function of them (generator from
    `item_generator(seed, step, position)`), so loading in worker processes changes nothing.
    """

    def __init__(self, seed: int, n: int, batch: int, start: int, stop: int, dist: "Dist"):
        self.seed, self.n, self.batch, self.start, self.stop, self.dist = seed, n, batch, start, stop, dist

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = batch_indices(self.seed, step, self.n, self.batch)
            yield [(step, pos, idx[pos]) for pos in self.dist.positions(self.batch)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def step_loader(dataset, seed: int, n: int, batch: int, start: int, stop: int, dist: "Dist", workers: int = 0):
    """A DataLoader over `StepBatches` (workers > 0 decode and augment in parallel processes)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(seed, n, batch, start, stop, dist),
                                       num_workers=workers, persistent_workers=False,
                                       pin_memory=dist.device.type == "cuda")


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def positions(self, batch: int) -> range:
        per = batch // self.world
        return range(self.rank * per, (self.rank + 1) * per)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def init_distributed(device: str = "auto") -> Dist:
    """Single process unless torchrun's WORLD_SIZE > 1; then join the process group (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, resolve_device(device))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Dist(rank, world, dev)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().reshape(val.shape)
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class TrainLoop:
    """Runs `step_fn` for steps [start, total) with lr = base_lr·schedule(step), checkpointing.

    step_fn(step) -> (loss tensor on this rank's slice, number of images this rank processed).
    The caller's `model` is the bare module whose state_dict is saved; `ddp_model` (optional) is the
    DDP wrapper used by step_fn (gradients are averaged by DDP).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    base_lr: float
    schedule: Callable[[int], float]
    run_dir: Path | None
    config: dict
    dist: Dist = field(default_factory=Dist)
    checkpoint_every: int = 100
    progress: bool = True
    desc: str = "train"
    step: int = 0
    history: list = field(default_factory=list)  # [(step, loss)] every `log_every` steps
    log_every: int = 10
    images_per_second: float | None = None  # measured by the last `run` (all ranks together)

    # State files -------------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path]:
        return self.run_dir / "state.safetensors", self.run_dir / "state.json"

    def save_state(self) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        st_path, js_path = self._paths()
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt_tensors, opt_meta = _optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        meta = {"step": self.step, "total_steps": self.total_steps, "config": self.config,
                "optimizer": opt_meta, "history": self.history}
        # Tensors first, JSON last: state.json names the step the tensors belong to.
        save_tensors(st_path, tensors, STATE_FORMAT, STATE_VERSION, self.config, step=self.step)
        atomic_write_text(js_path, json.dumps(meta, indent=1))

    def try_resume(self) -> bool:
        """Load state from run_dir when present (and made with the same config)."""
        if self.run_dir is None:
            return False
        st_path, js_path = self._paths()
        if not (st_path.is_file() and js_path.is_file()):
            return False
        meta = json.loads(js_path.read_text())
        if meta.get("config") != json.loads(json.dumps(self.config)):
            raise ValueError(f"{self.run_dir} holds a run with a different configuration; "
                             "use another run directory (or delete it to start over)")
        tensors = load_tensors(st_path)
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd, strict=True)
        _restore_optimizer(self.optimizer, {k: v.to(self.dist.device) for k, v in tensors.items()
                                            if k.startswith("optim.")}, meta["optimizer"])
        self.step = int(meta["step"])
        self.history = [tuple(h) for h in meta.get("history", [])]
        log.info("resumed %s at step %d/%d", self.run_dir, self.step, self.total_steps)
        return True

    # The loop ----------------------------------------------------------------------------
    def run(self, step_fn: Callable[[int], tuple[torch.Tensor, int]], stop_after: int | None = None) -> list:
        """Train until total_steps (or until `stop_after` more steps, then save: a simulated
        interruption). Returns the loss history."""
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, dynamic_ncols=True,
                   disable=not (self.progress and self.dist.main), mininterval=1.0)
        done_here, t0, imgs, run_loss, run_n = 0, time.perf_counter(), 0, 0.0, 0
        updating = False  # True while weights and self.step may disagree
        try:
            while self.step < self.total_steps:
                if stop_after is not None and done_here >= stop_after:
                    break
                lr = self.base_lr * self.schedule(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, n = step_fn(self.step)
                updating = True
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                value = float(loss.detach())
                run_loss, run_n = run_loss + value, run_n + 1
                imgs += n * self.dist.world
                self.step += 1
                updating = False
                done_here += 1
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    self.history.append((self.step, run_loss / run_n))
                    run_loss, run_n = 0.0, 0
                rate = imgs / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
                bar.update(1)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_state()
        except KeyboardInterrupt:
            if not updating:  # otherwise the last periodic checkpoint stands
                self.save_state()
            raise
        finally:
            bar.close()
        self.save_state()
        self.images_per_second = imgs / max(1e-9, time.perf_counter() - t0)
        return self.history


class Embed(nn.Module):
    """forward = the encoder's unit-norm embedding (what DDP wraps when the loss needs embeddings)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder._embed(x)


StepFn = Callable[[int], tuple[torch.Tensor, int]]


def train_encoder(encoder, forward: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer], config,
                  schedule: Callable[[int], float], record: dict, make_step: Callable[[nn.Module, int, Dist], StepFn],
                  run_dir: str | os.PathLike | None = None, dist: Dist | None = None, progress: bool = True,
                  stop_after: int | None = None, desc: str = "train") -> dict:
    """The training skeleton every stage shares; trains `encoder` in place.

    `forward` (a module over the encoder's parameters) is wrapped in DistributedDataParallel when
    the job has several ranks; `make_optimizer(trainable parameters)` builds the optimizer;
    `make_step(model, first_step, dist)` returns step_fn(step) -> (loss, images on this rank), given
    the (possibly wrapped) model and the step the run starts or resumes at. `config` supplies steps,
    lr, checkpoint_every and device; `record` is the JSON the training state is tied to (a run
    directory of another record is refused). The encoder's `net` (else the encoder) is what the
    training state saves. Returns {"history", "steps", "images_per_second", "seconds", "final_loss"}.
    """
    dist = dist or init_distributed(config.device)
    encoder.to(dist.device)
    encoder.train()
    encoder.requires_grad_(True)
    model = forward
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            forward, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    optimizer = make_optimizer([p for p in encoder.parameters() if p.requires_grad])
    loop = TrainLoop(getattr(encoder, "net", encoder), optimizer, config.steps, config.lr, schedule,
                     Path(run_dir) if run_dir else None, record, dist=dist, checkpoint_every=config.checkpoint_every,
                     progress=progress, desc=desc)
    loop.try_resume()
    step_fn = make_step(model, loop.step, dist)
    t0 = time.perf_counter()
    history = loop.run(step_fn, stop_after=stop_after)
    encoder.eval()
    encoder.pretrained = True  # its weights are now learned, whatever they started from
    return {"history": history, "steps": loop.step, "images_per_second": loop.images_per_second,
            "seconds": time.perf_counter() - t0, "final_loss": history[-1][1] if history else None}
