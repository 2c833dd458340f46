"""The bundled demo models, reproducible from a seed on 2 CPU cores: `robret train demo`.

    1. standard:demo  — the standard CNN (encoder.standard), NT-Xent on crops of DEMO_TRAIN_PHOTOS
    2. LipSim student — distilled from standard:demo on the same photos (view 2 = everyday edits of view 1)
    3. synthetic 2AFC — NIGHTS-layout sets (encoder.data.synthetic): a training set from
                        DEMO_TRAIN_PHOTOS (with distractor rows) and a held-out set from HELDOUT_PHOTOS
    4. lipsim:demo    — the student fine-tuned with the 2AFC hinge loss on the training set
    5. evaluation     — held-out 2AFC natural / certified / AutoAttack-ℓ2 scores and a near-duplicate
                        check, for both models; written into both checkpoints' provenance
Every stage resumes (training state in the run directory) and finished stages are skipped, so an
interrupted `robret train demo` continues where it stopped. The photos are scikit-image's and
matplotlib's sample photographs (encoder.samples); nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_lipsim, save_lipsim
from ..lipsim import LipSimEncoder
from ..preprocess import pil_to_tensor, resize
from ..presets import LipSimConfig
from ..samples import DEMO_TRAIN_PHOTOS, HELDOUT_PHOTOS, sample_photo
from ..standard import StandardConfig, StandardEncoder, load_standard, save_standard
from .contrastive import ContrastiveConfig, train_contrastive
from .distill import DistillConfig, EncoderTeacher, distill
from .finetune import FinetuneConfig, finetune

__all__ = ["DEMO_LIPSIM", "DemoPlan", "QUICK_PLAN", "load_photos", "run_demo"]

log = logging.getLogger(__name__)

# The demo LipSim shape: 64 px input, a 6-layer conv trunk of 16 channels, 3 dense layers of 512,
# 128 kept coordinates (= the standard CNN's embedding) + the constant. ~0.4M parameters, 1.6 MB.
DEMO_LIPSIM = LipSimConfig(input_size=64, channels=16, conv_depth=6, conv_inner=8, linear_depth=3, linear_inner=512,
                           embed_dim=128)


@dataclass(frozen=True)
class DemoPlan:
    """Everything that determines the demo models (the seed offsets each stage's own seed)."""

    seed: int = 0  # master seed
    photo_max_side: int = 320  # photos are downscaled (float, antialiased) to this longest side first
    standard: StandardConfig = StandardConfig(input_size=64, widths=(24, 48, 96, 192), embed_dim=128)
    contrastive: ContrastiveConfig = ContrastiveConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20,
                                                       crop_scale=(0.1, 1.0), device="cpu")
    lipsim: LipSimConfig = DEMO_LIPSIM
    distill: DistillConfig = DistillConfig(steps=800, batch_size=32, warmup_steps=40, target_scale=2.0,
                                           crop_scale=(0.1, 1.0), view2="edit", edit_strength=1.0, device="cpu")
    train_triplets_per_photo: int = 100  # synthetic 2AFC training rows per training photo
    distractor_p: float = 0.5  # share of training rows whose farther candidate is another photo's crop
    heldout_triplets_per_photo: int = 24  # synthetic 2AFC evaluation rows per held-out photo
    finetune: FinetuneConfig = FinetuneConfig(steps=400, batch_size=32, lr=1e-3, margin=0.5, peak=0.3,
                                              edit_p=0.3, edit_strength=0.5, device="cpu")
    eval_attack_limit: int = 96  # triplets attacked (the first ones of the held-out set)
    eval_attack_iters: int = 50  # APGD-CE iterations per ε
    eval_attack_eps: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255)  # AutoAttack ℓ2 budgets

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def seeded(self) -> "DemoPlan":
        """Stage configs with seeds derived from the master seed."""
        s = self.seed
        return dataclasses.replace(
            self, contrastive=self.contrastive.replace(seed=s), distill=self.distill.replace(seed=s + 1),
            finetune=self.finetune.replace(seed=s + 2))


# A few steps of everything: for tests and for trying the command (models are useless).
QUICK_PLAN = DemoPlan(
    photo_max_side=160,
    standard=StandardConfig(input_size=32, widths=(8, 16), embed_dim=16),
    contrastive=ContrastiveConfig(steps=4, batch_size=8, warmup_steps=1, device="cpu"),
    lipsim=LipSimConfig(input_size=32, channels=8, conv_depth=2, conv_inner=8, linear_depth=1, linear_inner=64,
                        embed_dim=16),
    distill=DistillConfig(steps=4, batch_size=8, warmup_steps=1, view2="edit", device="cpu"),
    train_triplets_per_photo=2, heldout_triplets_per_photo=2,
    finetune=FinetuneConfig(steps=4, batch_size=8, device="cpu"),
    eval_attack_limit=4, eval_attack_iters=3, eval_attack_eps=(36 / 255,),
)


def load_photos(names, max_side: int) -> list[tuple[str, torch.Tensor]]:
    """[(name, float (3,H,W) in [0,1])] for sample photos, downscaled so the longest side ≤ max_side."""
    out = []
    for name in names:
        x = pil_to_tensor(sample_photo(name))
        h, w = x.shape[-2:]
        if max(h, w) > max_side:
            f = max_side / max(h, w)
            x = resize(x, (max(1, round(h * f)), max(1, round(w * f)))).clamp(0, 1)
        out.append((name, x))
    return out


class _Timings:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, stage: str, seconds: float) -> None:
        self.data[stage] = self.data.get(stage, 0.0) + seconds
        self.path.write_text(json.dumps(self.data, indent=1))


def _summary(result: dict) -> dict:
    keep = ("steps", "images_per_second", "final_loss")
    out = {k: result.get(k) for k in keep}
    hist = result.get("history") or []
    if hist:
        out["first_loss"] = hist[0][1]
    return out


def run_demo(run_dir: str | Path = "runs/demo", weights_dir: str | Path | None = None, plan: DemoPlan = DemoPlan(),
             threads: int | None = 2, progress: bool = True, command: str = "robret train demo",
             echo=print) -> dict:
    """Train, evaluate and (when `weights_dir` is given) ship both demo models. Returns the metrics.

    Shipped files: <weights_dir>/standard_demo.safetensors and <weights_dir>/lipsim_demo.safetensors,
    each with provenance {command, data, plan, training summaries, wall times, metrics}.
    """
    from ..data.nights import NightsDataset, read_nights
    from ..data.synthetic import make_synthetic_nights
    from ..evaluate import evaluate_2afc, evaluate_near_duplicates, format_table

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = plan.seeded()
    plan_json = json.loads(json.dumps(plan.to_dict()))
    plan_file = run_dir / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan_json:
        raise ValueError(f"{run_dir} holds a demo run with a different plan; use another --run-dir")
    plan_file.write_text(json.dumps(plan_json, indent=1))
    timings = _Timings(run_dir / "timings.json")
    summaries_file = run_dir / "summaries.json"
    summaries = json.loads(summaries_file.read_text()) if summaries_file.is_file() else {}

    def save_summaries():
        summaries_file.write_text(json.dumps(summaries, indent=1))

    train_photos = load_photos(DEMO_TRAIN_PHOTOS, plan.photo_max_side)
    train_images = [x for _, x in train_photos]

    # 1. Standard CNN ------------------------------------------------------------------------------
    std_path = run_dir / "standard.safetensors"
    if not std_path.is_file():
        echo(f"[1/5] standard CNN: {plan.contrastive.steps} steps of NT-Xent on {len(train_images)} photos")
        torch.manual_seed(plan.seed + 6)
        std = StandardEncoder(plan.standard, name="standard:demo")
        t0 = time.perf_counter()
        res = train_contrastive(std, train_images, plan.contrastive, run_dir=run_dir / "standard", progress=progress)
        timings.add("standard", time.perf_counter() - t0)
        summaries["standard"] = _summary(res)
        save_summaries()
        save_standard(std.freeze(), std_path, provenance={"stage": "contrastive", **summaries["standard"]})
    std = load_standard(std_path, name="standard:demo")

    # 2. Distillation ------------------------------------------------------------------------------
    dist_path = run_dir / "lipsim_distilled.safetensors"
    if not dist_path.is_file():
        echo(f"[2/5] LipSim distillation from standard:demo: {plan.distill.steps} steps")
        torch.manual_seed(plan.seed + 5)
        student = LipSimEncoder(plan.lipsim, name="lipsim:demo")
        t0 = time.perf_counter()
        res = distill(student, EncoderTeacher(std), train_images, plan.distill, run_dir=run_dir / "distill",
                      progress=progress)
        timings.add("distill", time.perf_counter() - t0)
        summaries["distill"] = _summary(res)
        save_summaries()
        save_lipsim(student.freeze(), dist_path, provenance={"stage": "distill", **summaries["distill"]})

    # 3. Synthetic 2AFC sets -----------------------------------------------------------------------
    size = plan.lipsim.input_size
    t0 = time.perf_counter()
    train_root = run_dir / "nights-train"
    if not (train_root / "nights" / "data.csv").is_file():
        echo(f"[3/5] synthetic 2AFC sets ({plan.train_triplets_per_photo}/photo train, "
             f"{plan.heldout_triplets_per_photo}/photo held out)")
        make_synthetic_nights(train_photos, train_root, per_image=plan.train_triplets_per_photo, size=size,
                              split="train", seed=plan.seed + 3, distractor_p=plan.distractor_p)
    heldout_root = run_dir / "nights-heldout"
    if not (heldout_root / "nights" / "data.csv").is_file():
        make_synthetic_nights(load_photos(HELDOUT_PHOTOS, plan.photo_max_side), heldout_root,
                              per_image=plan.heldout_triplets_per_photo, size=size, split="test", seed=plan.seed + 4)
    timings.add("synthetic", time.perf_counter() - t0)

    # 4. 2AFC fine-tuning --------------------------------------------------------------------------
    ft_path = run_dir / "lipsim_finetuned.safetensors"
    if not ft_path.is_file():
        echo(f"[4/5] 2AFC hinge fine-tuning: {plan.finetune.steps} steps, margin {plan.finetune.margin}")
        student = load_lipsim(dist_path, name="lipsim:demo", freeze=False)
        ds = NightsDataset(read_nights(train_root, "train"), size, cache=True)
        t0 = time.perf_counter()
        res = finetune(student, ds, plan.finetune, run_dir=run_dir / "finetune", progress=progress)
        timings.add("finetune", time.perf_counter() - t0)
        summaries["finetune"] = _summary(res)
        save_summaries()
        save_lipsim(student.freeze(), ft_path, provenance={"stage": "finetune", **summaries["finetune"]})

    # 5. Evaluation on held-out photos -------------------------------------------------------------
    eval_path = run_dir / "eval.json"
    if not eval_path.is_file():
        echo("[5/5] evaluation on held-out photos")
        t0 = time.perf_counter()
        rows = read_nights(heldout_root, "test")
        ref, x0, x1, p = NightsDataset(rows, size).tensors()
        heldout_photos = [x for _, x in load_photos(HELDOUT_PHOTOS, plan.photo_max_side)]
        models = {"lipsim:demo": load_lipsim(ft_path, name="lipsim:demo"), "standard:demo": std,
                  "lipsim:demo before fine-tuning": load_lipsim(dist_path, name="lipsim:demo before fine-tuning")}
        results = {}
        for name, enc in models.items():
            attacks = ("autoattack-L2",) if "before" not in name else ()
            r = evaluate_2afc(enc, ref, x0, x1, p, attacks=attacks, attack_eps={"autoattack-L2": plan.eval_attack_eps},
                              attack_limit=plan.eval_attack_limit, n_iter=plan.eval_attack_iters, seed=plan.seed)
            r["near_duplicates"] = evaluate_near_duplicates(enc, heldout_photos, seed=plan.seed)
            results[name] = r
            echo(f"  {name}: natural {r['natural']:.3f}")
        timings.add("evaluate", time.perf_counter() - t0)
        eval_path.write_text(json.dumps(results, indent=1))
        (run_dir / "eval.md").write_text(format_table(list(results.values())) + "\n")
    results = json.loads(eval_path.read_text())
    echo(format_table(list(results.values())))

    data = {
        "photos": "scikit-image / matplotlib sample photographs (encoder.samples)",
        "train_photos": list(DEMO_TRAIN_PHOTOS), "heldout_photos": list(HELDOUT_PHOTOS),
        "2afc_train": f"synthetic NIGHTS-layout set from the training photos ({plan.train_triplets_per_photo}/photo, "
                      f"distractor_p={plan.distractor_p}); NOT human judgements",
        "2afc_eval": f"synthetic NIGHTS-layout set from the held-out photos ({plan.heldout_triplets_per_photo}/photo)",
    }
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    timings_data = json.loads((run_dir / "timings.json").read_text())
    if weights_dir is not None:
        weights_dir = Path(weights_dir)
        common = {"command": command, "data": data, "plan": plan_json, "training": summaries,
                  "wall_seconds": timings_data, "environment": env}
        save_standard(std, weights_dir / "standard_demo.safetensors",
                      provenance={**common, "model": "standard:demo", "metrics": results["standard:demo"]})
        save_lipsim(load_lipsim(ft_path, name="lipsim:demo"), weights_dir / "lipsim_demo.safetensors",
                    preset="custom", provenance={**common, "model": "lipsim:demo", "teacher": "standard:demo",
                                                 "metrics": results["lipsim:demo"],
                                                 "metrics_before_finetuning": results["lipsim:demo before fine-tuning"]})
        echo(f"shipped {weights_dir / 'lipsim_demo.safetensors'} and {weights_dir / 'standard_demo.safetensors'}")
    return {"metrics": results, "wall_seconds": timings_data, "training": summaries}
