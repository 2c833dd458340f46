"""`robret train …`: LipSim distillation and 2AFC fine-tuning, the standard baseline, 2AFC evaluation,
and the reproducible demo models.

    robret train demo                                   # both bundled demo models, from seed 0, on CPU
    robret train standard PHOTOS --out std.safetensors  # the contrastive CNN baseline on any folder
    robret train robdml --demo                          # robdml:demo (HM[S, g_LGA] + ICS from standard:demo)
    robret train robdml CLASSES/ --init standard:demo --out robust.safetensors   # class/image.jpg folder
    robret train teacher-embed IMAGES --teacher dreamsim:ensemble --out teacher.safetensors
    robret train distill IMAGES --teacher SPEC | --teacher-embeddings FILE --preset small --out s1.safetensors
    robret train finetune NIGHTS --init s1.safetensors --margin 0.5 --out s2.safetensors
    robret train eval SPEC [SPEC …] --nights NIGHTS --split test
    robret train synth PHOTOS OUT                       # a synthetic 2AFC set in NIGHTS' layout
Multi-GPU / multi-node: launch the same command under `torchrun` (see docs/training.md).
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

from ._argtypes import UsageError, check_linf_eps, pixel_eps


def _command_line(args) -> str:
    return "robret " + " ".join(shlex.quote(a) for a in args.argv)


def register(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate encoders (LipSim distillation, 2AFC fine-tuning, demo)",
                       description="Train LipSim (teacher distillation, then 2AFC hinge fine-tuning), the "
                       "standard CNN baseline, evaluate 2AFC scores, or reproduce the bundled demo models.")
    tsub = p.add_subparsers(dest="train_command", metavar="ACTION", required=True)

    d = tsub.add_parser("demo", help="reproduce the bundled demo models (standard:demo, lipsim:demo) on CPU",
                        description="Train standard:demo and lipsim:demo from a seed on the sample photos "
                        "(encoder.samples.DEMO_TRAIN_PHOTOS) and the wallpaper photographs' training split "
                        "(`make photos` installs them; --quick needs none), evaluate them on held-out photos "
                        "and write them to --weights-dir. Resumes an interrupted run from --run-dir. Tip on a busy "
                        "machine: OMP_WAIT_POLICY=PASSIVE robret train demo.")
    d.add_argument("--run-dir", default="runs/demo", help="working directory (training states, synthetic sets)")
    d.add_argument("--weights-dir", default=None, help="where the shipped files go (default: encoder/weights)")
    d.add_argument("--no-ship", action="store_true", help="train and evaluate only; write no weights")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; 0 leaves torch's default)")
    d.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test; useless models)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--compare-to", metavar="DIR", default=None,
                   help="after the run, compare its two models with the demo files in DIR (encoder/weights: the "
                   "shipped ones) tensor by tensor, and its held-out scores with those their provenance records; "
                   "exit 1 when a score differs by more than --tolerance. Use with --no-ship")
    d.add_argument("--tolerance", type=float, default=0.02,
                   help="--compare-to: largest accepted difference of a score, as a fraction (default 0.02: two "
                   "points; the same machine and library versions reproduce the files bit for bit)")
    d.set_defaults(func=_demo)

    s = tsub.add_parser("standard", help="train the standard (non-Lipschitz) CNN baseline on an image folder")
    s.add_argument("images", help="image folder (recursive)")
    s.add_argument("--out", required=True, help="output .safetensors")
    s.add_argument("--run-dir", default=None, help="resumable training state (default: OUT without suffix + .run)")
    s.add_argument("--input-size", type=int, default=64)
    s.add_argument("--embed-dim", type=int, default=128)
    _common(s, steps=500, batch=64, lr=2e-3)
    s.add_argument("--temperature", type=float, default=0.2)
    s.add_argument("--crop-scale", type=float, nargs=2, default=(0.1, 1.0), metavar=("MIN", "MAX"),
                   help="area fraction of the random crops (default 0.1 1)")
    s.add_argument("--view-flip-p", type=float, default=0.0,
                   help="probability that each view is also mirrored on its own (default 0: views share the flip)")
    s.set_defaults(func=_standard)

    r = tsub.add_parser("robdml", help="robust metric learning of the standard CNN: HM[S, g_LGA] + ICS (Zhou & Patel 2022)",
                        description="Adversarial metric learning (hardness manipulation, softhard source, linear "
                        "gradual adversary, intra-class structure term; encoder.train.robdml, docs/training.md). "
                        "Classes: the sub-folders of IMAGES (class/image.jpg), or with --classes regions the "
                        "regions of every photo in IMAGES (the near-duplicate benchmark's labels). --demo trains "
                        "and ships robdml:demo.")
    r.add_argument("images", nargs="?", default=None, help="labelled folder (class/image.jpg), or photos with "
                   "--classes regions; not with --demo")
    r.add_argument("--demo", action="store_true", help="train robdml:demo from the bundled standard:demo on the "
                   "demo photos and ship it to --weights-dir")
    r.add_argument("--weights-dir", default=None, help="--demo: where the shipped file goes (default: encoder/weights)")
    r.add_argument("--no-ship", action="store_true", help="--demo: train only; write no weights")
    r.add_argument("--quick", action="store_true", help="--demo: a few tiny steps (smoke test; useless model)")
    r.add_argument("--threads", type=int, default=2, help="--demo: torch CPU threads (0 leaves torch's default)")
    r.add_argument("--classes", choices=("folder", "regions"), default="folder",
                   help="folder: sub-folders are classes; regions: each region of each photo is a class")
    r.add_argument("--regions-per-photo", type=int, default=36)
    r.add_argument("--init", default="standard:demo", help="starting weights: standard:SPEC or a .safetensors file")
    r.add_argument("--input-size", type=int, default=None, help="image side (default: the init model's)")
    r.add_argument("--out", default=None, help="output .safetensors (required without --demo)")
    r.add_argument("--run-dir", default=None, help="resumable training state (default: OUT.run, or runs/robdml-demo)")
    _common(r, steps=400, batch=64, lr=5e-4)
    r.add_argument("--eps", type=pixel_eps, default=8 / 255, help="ℓ∞ budget of the hardness manipulation (8/255)")
    r.add_argument("--pgd-step", type=pixel_eps, default=1 / 255, help="PGD step α (1/255)")
    r.add_argument("--pgd-steps", type=int, default=32, help="PGD iterations (32)")
    r.add_argument("--margin", type=float, default=0.2, help="triplet margin ξ, also the gradual adversary's cap")
    r.add_argument("--ics-weight", type=float, default=0.5, help="λ of the intra-class structure term (0: off)")
    r.add_argument("--source", choices=("softhard", "semihard", "random"), default="softhard")
    r.add_argument("--destination", choices=("softhard", "semihard", "random"), default="semihard",
                   help="destination triplets (used with --no-gradual)")
    r.add_argument("--no-gradual", dest="gradual", action="store_false", help="destination = mined triplets' hardness")
    r.add_argument("--no-adversary", dest="adversary", action="store_false",
                   help="plain triplet training on the source triplets (the undefended reference)")
    r.set_defaults(func=_robdml)

    te = tsub.add_parser("teacher-embed", help="run a teacher once over an image folder (for distill)")
    te.add_argument("images")
    te.add_argument("--teacher", required=True, help="encoder spec, e.g. dreamsim:ensemble or standard:demo")
    te.add_argument("--out", required=True)
    te.add_argument("--batch-size", type=int, default=64)
    te.add_argument("--device", default="auto")
    te.add_argument("--cache-dir", default=None, help="DreamSim weights directory (dreamsim: teachers)")
    te.set_defaults(func=_teacher_embed)

    di = tsub.add_parser("distill", help="stage 1: distil a teacher into a LipSim student",
                         description="LipSim stage 1: loss ½[RMSE(x(v1), c·t(v1)) + RMSE(x(v2), c·t(v1))] "
                         "(+ λ·retrieval margin hinge with --retrieval-weight), Adam(0.5, 0.9), cosine schedule "
                         "with warm-up.")
    di.add_argument("images", help="image folder (recursive), e.g. ImageNet's train/")
    teacher = di.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", help="teacher encoder spec (dreamsim:ensemble, standard:demo, …)")
    teacher.add_argument("--teacher-embeddings", help="file from `robret train teacher-embed`")
    shape = di.add_mutually_exclusive_group(required=True)
    shape.add_argument("--preset", help="LipSim preset (small, cpu-small, …)")
    shape.add_argument("--config", help="LipSimConfig as JSON text or a .json file")
    di.add_argument("--out", required=True)
    di.add_argument("--run-dir", default=None)
    _common(di, steps=1000, batch=32, lr=0.01)
    di.add_argument("--epochs", type=float, default=None, help="alternative to --steps: passes over the folder")
    di.add_argument("--cache-dir", default=None, help="DreamSim weights directory (dreamsim: teachers)")
    di.add_argument("--warmup-steps", type=int, default=50)
    di.add_argument("--target-scale", type=float, default=1.0, help="c in the loss (default 1, the paper's)")
    di.add_argument("--view2", choices=("crop", "edit"), default="crop")
    di.add_argument("--flip-p", type=float, default=0.0, help="--view2 edit: probability that v2 is also mirrored")
    di.add_argument("--retrieval-weight", type=float, default=0.0,
                    help="λ of the retrieval term mean max(0, m − (S_ii − max_j S_ij)) over the batch's other "
                         "images (default 0: the paper's loss)")
    di.add_argument("--retrieval-margin", type=float, default=0.2, help="m of the retrieval term (cosine similarity)")
    di.add_argument("--cache", action="store_true", help="decode all images once into memory (small folders)")
    di.add_argument("--workers", type=int, default=0, help="data loading processes (same results; default 0)")
    di.set_defaults(func=_distill)

    ft = tsub.add_parser("finetune", help="stage 2: 2AFC hinge fine-tuning on a NIGHTS-layout folder",
                         description="LipSim stage 2: mean max(0, m − y'(d(x,x0) − d(x,x1))), y' = 2·round(p) − 1, "
                         "triangular learning rate.")
    ft.add_argument("nights", help="folder holding data.csv (or its parent)")
    ft.add_argument("--init", required=True, help="encoder spec or checkpoint to start from (lipsim:FILE, FILE)")
    ft.add_argument("--out", required=True)
    ft.add_argument("--run-dir", default=None)
    _common(ft, steps=None, batch=32, lr=1e-3)
    ft.add_argument("--epochs", type=float, default=None, help="alternative to --steps")
    ft.add_argument("--margin", type=float, default=0.5, help="hinge margin (LipSim: 0.2, 0.4, 0.5)")
    ft.add_argument("--peak", type=float, default=0.3, help="fraction of steps before the lr peak")
    ft.add_argument("--cache", action="store_true")
    ft.add_argument("--workers", type=int, default=0, help="data loading processes (same results; default 0)")
    ft.set_defaults(func=_finetune)

    ev = tsub.add_parser("eval", help="2AFC natural / certified / attacked scores on a NIGHTS-layout folder")
    ev.add_argument("specs", nargs="+", help="encoder specs (lipsim:demo, standard:demo, dreamsim:ensemble, …)")
    ev.add_argument("--nights", required=True, help="folder holding data.csv (or its parent)")
    ev.add_argument("--split", default="test", help="train, val, test (= size-weighted test_imagenet + "
                    "test_no_imagenet), test_imagenet, test_no_imagenet, all")
    ev.add_argument("--attacks", nargs="*", default=["autoattack-L2"],
                    help="autoattack-L2 autoattack-Linf pgd-L2 pgd-Linf (none: --attacks)")
    ev.add_argument("--eps", nargs="*", type=float, default=None, help="certified ε's in 1/255 units (default "
                    "36 72 108 255)")
    ev.add_argument("--attack-eps", nargs="*", type=float, default=None, help="attack ε's in 1/255 units "
                    "(default: ℓ2 36 72 108, ℓ∞ 1 2 4)")
    ev.add_argument("--attack-limit", type=int, default=None, help="attack only the first N triplets")
    ev.add_argument("--iters", type=int, default=100, help="attack iterations")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N triplets")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=_eval)

    sy = tsub.add_parser("synth", help="write a SYNTHETIC 2AFC set in NIGHTS' layout from a photo folder")
    sy.add_argument("photos")
    sy.add_argument("out")
    sy.add_argument("--per-image", type=int, default=20)
    sy.add_argument("--size", type=int, default=128)
    sy.add_argument("--split", default="train")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--distractor-p", type=float, default=0.0)
    sy.set_defaults(func=_synth)


def _common(p, steps, batch, lr) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch, help="global batch (all ranks together)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA per LOCAL_RANK when available), cpu, cuda:0")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--no-progress", action="store_true")


def _run_dir(args) -> Path:
    return Path(args.run_dir) if args.run_dir else Path(args.out).with_suffix(".run")


def _demo(args) -> int:
    import logging

    from encoder.evaluate import format_table
    from encoder.registry import WEIGHTS_DIR
    from encoder.train.demo import QUICK_PLAN, DemoPlan, compare_with_shipped, format_comparison, run_demo

    plan = dataclasses.replace(QUICK_PLAN if args.quick else DemoPlan(), seed=args.seed)
    weights = None if args.no_ship else Path(args.weights_dir or WEIGHTS_DIR)
    if args.quick and weights is not None and args.weights_dir is None:
        weights = None  # never overwrite the bundled models with a smoke test
    if args.compare_to is not None:
        compare_to = Path(args.compare_to)
        if not (compare_to / "lipsim_demo.safetensors").is_file():
            raise UsageError(f"--compare-to {args.compare_to}: no lipsim_demo.safetensors there")
        if weights is not None and weights.resolve() == compare_to.resolve():
            raise UsageError(f"--compare-to {args.compare_to} is where this run would ship its models: add --no-ship")
        if not (0 <= args.tolerance <= 1):
            raise UsageError(f"--tolerance must be a fraction between 0 and 1, not {args.tolerance}")
    # The reproducing command (flags that change the models only; paths and threads do not).
    command = "robret train demo" + (" --quick" if args.quick else "") + (f" --seed {args.seed}" if args.seed else "")
    # The demo logs its stages; show them on stdout while it runs.
    logger = logging.getLogger("encoder.train.demo")
    handler, level, propagate = logging.StreamHandler(sys.stdout), logger.level, logger.propagate
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    logger.propagate = False  # not a second time through the root logger's warning handler
    try:
        result = run_demo(args.run_dir, weights, plan, threads=args.threads, progress=not args.no_progress,
                          command=command)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    print(format_table(list(result["metrics"].values())))
    if args.compare_to is None:
        return 0
    report = compare_with_shipped(args.run_dir, args.compare_to, tolerance=args.tolerance)
    print(format_comparison(report, args.compare_to))
    return 0 if report["reproduced"] else 1


def _standard(args) -> int:
    from encoder.data import ImageFolder
    from encoder.standard import StandardConfig, StandardEncoder, save_standard
    from encoder.train import ContrastiveConfig, train_contrastive
    from encoder.train._loop import init_distributed

    cfg = ContrastiveConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            temperature=args.temperature, crop_scale=tuple(args.crop_scale),
                            view_flip_p=args.view_flip_p, checkpoint_every=args.checkpoint_every, device=args.device)
    dist = init_distributed(args.device)
    images = ImageFolder(args.images, cache=True)
    _report_skipped(images)
    import torch

    torch.manual_seed(args.seed)
    enc = StandardEncoder(StandardConfig(input_size=args.input_size, embed_dim=args.embed_dim),
                          name=f"standard:{Path(args.out).stem}")
    res = train_contrastive(enc, images, cfg, run_dir=_run_dir(args), progress=not args.no_progress, dist=dist)
    if dist.main:
        save_standard(enc.freeze(), args.out, provenance={"command": _command_line(args), "data": str(args.images),
                                                          "config": cfg.to_dict(), "final_loss": res["final_loss"]})
        print(f"wrote {args.out} (final loss {res['final_loss']:.4f})")
    return 0


def _robdml(args) -> int:
    from encoder.train.robdml import FolderClasses, RegionClasses, RobDMLConfig, train_robdml

    check_linf_eps(args.eps)
    if args.demo and args.images is not None:  # (--demo trains on the bundled photos: IMAGES would be ignored)
        raise UsageError(f"--demo trains on the bundled photos: drop {args.images}, or drop --demo and give --out")
    if args.demo:
        return _robdml_demo(args)
    if args.images is None or args.out is None:
        raise ValueError("robret train robdml needs IMAGES and --out (or --demo)")
    from encoder import load_encoder
    from encoder.data import ImageFolder
    from encoder.standard import StandardEncoder, save_standard
    from encoder.train._loop import init_distributed

    dist = init_distributed(args.device)
    spec = args.init if ":" in args.init else f"standard:{args.init}"
    enc = load_encoder(spec)
    if not isinstance(enc, StandardEncoder):
        raise ValueError(f"--init {args.init}: robust metric learning trains the standard CNN (standard:…, robdml:…)")
    size = args.input_size or enc.input_size
    if size != enc.input_size:
        raise ValueError(f"--input-size {size} differs from the init model's {enc.input_size}")
    if args.classes == "folder":
        classes = FolderClasses(args.images, size)
    else:
        folder = ImageFolder(args.images, cache=True)
        _report_skipped(folder)
        classes = RegionClasses([folder[i] for i in range(len(folder))], size,
                                regions_per_photo=args.regions_per_photo, seed=args.seed)
    cfg = RobDMLConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, margin=args.margin,
                       adversary=args.adversary, eps=args.eps, pgd_step=args.pgd_step, pgd_steps=args.pgd_steps,
                       source=args.source, destination=args.destination, gradual=args.gradual,
                       ics_weight=args.ics_weight, seed=args.seed, checkpoint_every=args.checkpoint_every,
                       device=args.device)
    enc.name = f"robdml:{Path(args.out).stem}"
    res = train_robdml(enc, classes, cfg, run_dir=_run_dir(args), progress=not args.no_progress, dist=dist)
    if dist.main:
        save_standard(enc.freeze(), args.out, provenance={
            "command": _command_line(args), "stage": "robdml", "init": args.init, "data": str(args.images),
            "classes": {"kind": args.classes, "count": len(classes)}, "config": cfg.to_dict(),
            "final_loss": res["final_loss"]})
        print(f"wrote {args.out} (final loss {res['final_loss']:.4f}, {len(classes)} classes); "
              f"load it as robdml:{args.out}")
    return 0


def _robdml_demo(args) -> int:
    import logging

    from encoder.registry import WEIGHTS_DIR
    from encoder.train.demo import QUICK_ROBDML_PLAN, RobDMLDemoPlan, run_robdml_demo

    plan = dataclasses.replace(QUICK_ROBDML_PLAN if args.quick else RobDMLDemoPlan(), seed=args.seed)
    weights = None if args.no_ship else Path(args.weights_dir or WEIGHTS_DIR)
    if args.quick and args.weights_dir is None:
        weights = None  # never overwrite the bundled model with a smoke test
    command = "robret train robdml --demo" + (" --quick" if args.quick else "") + \
        (f" --seed {args.seed}" if args.seed else "")
    logging.getLogger("encoder.train.demo").setLevel(logging.INFO)
    res = run_robdml_demo(args.run_dir or "runs/robdml-demo", weights, plan, threads=args.threads,
                          progress=not args.no_progress, command=command)
    s = res["summary"]
    print(f"robdml:demo: {s['steps']} steps, loss {s.get('first_loss', float('nan')):.4f} → {s['final_loss']:.4f}, "
          f"{res['wall_seconds']:.0f} s" + (f"; wrote {res['path']}" if res["path"] else ""))
    return 0


def _report_skipped(folder) -> None:
    for path, reason in folder.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)


def _teacher_embed(args) -> int:
    from encoder import load_encoder
    from encoder.data import ImageFolder
    from encoder.train import compute_teacher_embeddings
    from encoder.train._loop import resolve_device

    enc = load_encoder(args.teacher, device=resolve_device(args.device), **_teacher_kwargs(args))
    folder = ImageFolder(args.images)
    _report_skipped(folder)
    compute_teacher_embeddings(enc, folder, args.out, batch_size=args.batch_size)
    print(f"wrote {args.out}: {len(folder)} embeddings of dimension {enc.dim} from {enc.name}")
    return 0


def _lipsim_config(args):
    from encoder.presets import LipSimConfig, get_preset

    if args.preset:
        return args.preset, get_preset(args.preset)
    text = Path(args.config).read_text() if args.config.endswith(".json") else args.config
    return "custom", LipSimConfig.from_json(text)


def _teacher_kwargs(args) -> dict:
    return {"cache_dir": args.cache_dir} if args.cache_dir and args.teacher.startswith("dreamsim") else {}


def _distill(args) -> int:
    import math

    import torch

    from encoder import load_encoder, save_lipsim
    from encoder.data import ImageFolder
    from encoder.lipsim import LipSimEncoder
    from encoder.train import DistillConfig, EncoderTeacher, PrecomputedTeacher, distill
    from encoder.train._loop import init_distributed

    dist = init_distributed(args.device)
    preset, shape = _lipsim_config(args)
    images = ImageFolder(args.images, cache=args.cache)
    _report_skipped(images)
    if args.teacher:
        teacher = EncoderTeacher(load_encoder(args.teacher, device=dist.device, **_teacher_kwargs(args)))
    else:
        teacher = PrecomputedTeacher(args.teacher_embeddings, images)
    steps = args.steps if args.epochs is None else math.ceil(args.epochs * len(images) / args.batch_size)
    cfg = DistillConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        warmup_steps=args.warmup_steps, target_scale=args.target_scale, view2=args.view2,
                        flip_p=args.flip_p, retrieval_weight=args.retrieval_weight,
                        retrieval_margin=args.retrieval_margin, checkpoint_every=args.checkpoint_every,
                        device=args.device)
    torch.manual_seed(args.seed)
    student = LipSimEncoder(shape, name=f"lipsim:{Path(args.out).stem}")
    res = distill(student, teacher, images, cfg, run_dir=_run_dir(args), progress=not args.no_progress, dist=dist,
                  workers=args.workers)
    if dist.main:
        save_lipsim(student.freeze(), args.out, preset=preset, provenance={
            "command": _command_line(args), "stage": "distill", "teacher": teacher.name, "data": str(args.images),
            "config": cfg.to_dict(), "final_loss": res["final_loss"]})
        print(f"wrote {args.out} (final loss {res['final_loss']:.4f}, {res['images_per_second'] or 0:.1f} images/s)")
    return 0


def _finetune(args) -> int:
    import math

    from encoder import load_encoder, save_lipsim
    from encoder.data import NightsDataset, read_nights
    from encoder.lipsim import LipSimEncoder
    from encoder.train import FinetuneConfig, finetune
    from encoder.train._loop import init_distributed

    dist = init_distributed(args.device)
    spec = args.init if ":" in args.init else f"lipsim:{args.init}"
    enc = load_encoder(spec)
    rows = read_nights(args.nights, "train", check_files=True)
    steps = args.steps
    if steps is None:
        steps = math.ceil((args.epochs or 1.0) * len(rows) / args.batch_size)
    cfg = FinetuneConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, margin=args.margin, peak=args.peak,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device)
    res = finetune(enc, NightsDataset(rows, enc.input_size, cache=args.cache), cfg, run_dir=_run_dir(args),
                   progress=not args.no_progress, dist=dist, workers=args.workers)
    if dist.main:
        prov = {"command": _command_line(args), "stage": "finetune", "init": args.init, "data": str(args.nights),
                "config": cfg.to_dict(), "final_loss": res["final_loss"]}
        if isinstance(enc, LipSimEncoder):
            save_lipsim(enc.freeze(), args.out, preset=enc.metadata.get("preset") or "custom", provenance=prov)
        else:
            from encoder.standard import save_standard

            save_standard(enc.freeze(), args.out, provenance=prov)
        print(f"wrote {args.out} (final loss {res['final_loss']:.4f})")
    return 0


def _eval(args) -> int:
    from encoder import load_encoder
    from encoder.data import NightsDataset, read_nights
    from encoder.evaluate import EPSILONS, combine_results, evaluate_2afc, format_table

    eps = tuple(e / 255 for e in args.eps) if args.eps else EPSILONS
    parts = ["test_imagenet", "test_no_imagenet"] if args.split == "test" else [args.split]
    out = []
    for spec in args.specs:
        enc = load_encoder(spec, device=args.device)
        attack_eps = None
        if args.attack_eps:
            attack_eps = {a: tuple(e / 255 for e in args.attack_eps) for a in args.attacks}
        per_part = {}
        for part in parts:
            rows = read_nights(args.nights, part)[: args.limit]
            if not rows:
                continue
            ref, x0, x1, p = NightsDataset(rows, enc.input_size).tensors()
            per_part[part] = evaluate_2afc(enc, ref, x0, x1, p, eps=eps, attacks=tuple(args.attacks),
                                           attack_eps=attack_eps, attack_limit=args.attack_limit, n_iter=args.iters)
        if not per_part:
            raise ValueError(f"no rows with ≥ 6 votes in split {args.split!r} of {args.nights}")
        res = combine_results(per_part) if len(per_part) > 1 else next(iter(per_part.values()))
        res["split"] = args.split
        out.append(res)
    print(format_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


def _synth(args) -> int:
    from encoder.data import make_synthetic_nights

    root = make_synthetic_nights(args.photos, args.out, per_image=args.per_image, size=args.size, split=args.split,
                                 seed=args.seed, distractor_p=args.distractor_p)
    print(f"wrote a SYNTHETIC 2AFC set in NIGHTS' layout: {root}")
    return 0
