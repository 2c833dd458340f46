"""Training stages on tiny fixtures: each lowers its loss, resume is bitwise, state files are
safetensors + JSON, schedules match hand-computed values, DDP (gloo) runs on CPU."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from encoder.data import NightsDataset, make_synthetic_nights, read_nights
from encoder.lipsim import LipSimEncoder
from encoder.presets import LipSimConfig
from encoder.standard import StandardConfig, StandardEncoder
from encoder.train import (ContrastiveConfig, DistillConfig, EncoderTeacher, FinetuneConfig, cosine_with_warmup,
                           distill, finetune, hinge_2afc_loss, train_contrastive, triangular)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LipSimConfig(input_size=16, channels=6, conv_depth=2, conv_inner=4, linear_depth=1, linear_inner=32, pools=1,
                    embed_dim=8)
STD = StandardConfig(input_size=16, widths=(8, 16), embed_dim=8)


@pytest.fixture(scope="module")
def photos():
    g = torch.Generator().manual_seed(0)
    # Smooth random "photos": low-resolution noise upsampled, so crops differ but are not white noise.
    return [torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(40, 48), mode="bilinear",
                                            align_corners=False)[0] for _ in range(4)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return StandardEncoder(STD).freeze()


def _student(seed=0):
    torch.manual_seed(seed)
    return LipSimEncoder(TINY)


def _equal_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_schedules_match_hand_computed_values():
    assert cosine_with_warmup(0, 10, 2) == 0.5 and cosine_with_warmup(1, 10, 2) == 1.0
    assert cosine_with_warmup(2, 10, 2) == 1.0
    assert cosine_with_warmup(6, 10, 2) == pytest.approx(0.5)  # halfway through the decay
    assert cosine_with_warmup(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)
    assert [triangular(s, 4, 0.5) for s in range(4)] == [0.5, 1.0, 0.5, 0.5]
    assert triangular(0, 10, 0.3) == pytest.approx(1 / 3) and triangular(2, 10, 0.3) == 1.0


def test_hinge_loss_sign_convention_p_is_the_right_image():
    d0, d1 = torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.1])
    # p = 1: people chose x1, which is closer here by 0.4: loss max(0, m − 0.4)
    assert hinge_2afc_loss(d0, d1, torch.tensor([1.0, 1.0]), 0.5).item() == pytest.approx(0.1)
    # p = 0: people chose x0, the model disagrees: loss m + 0.4
    assert hinge_2afc_loss(d0, d1, torch.tensor([0.0, 0.2]), 0.5).item() == pytest.approx(0.9)
    assert hinge_2afc_loss(d0, d1, torch.tensor([0.9, 0.9]), 0.2).item() == 0.0


def test_distillation_lowers_its_loss(photos, teacher):
    res = distill(_student(), EncoderTeacher(teacher), photos,
                  DistillConfig(steps=30, batch_size=8, warmup_steps=3, view2="edit", device="cpu"), progress=False)
    (_, first), *_, (_, last) = res["history"]
    assert res["steps"] == 30 and last < 0.5 * first


def test_distillation_rejects_a_teacher_of_another_dimension(photos):
    other = StandardEncoder(StandardConfig(input_size=16, widths=(8,), embed_dim=5)).freeze()
    with pytest.raises(ValueError, match="embed_dim"):
        distill(_student(), EncoderTeacher(other), photos, DistillConfig(steps=1, device="cpu"), progress=False)


def test_distillation_resume_gives_the_same_weights_as_an_uninterrupted_run(photos, teacher, tmp_path):
    cfg = DistillConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=2, device="cpu")
    straight = _student()
    distill(straight, EncoderTeacher(teacher), photos, cfg, run_dir=tmp_path / "a", progress=False)
    interrupted = _student()
    distill(interrupted, EncoderTeacher(teacher), photos, cfg, run_dir=tmp_path / "b", progress=False, stop_after=3)
    assert not _equal_weights(straight.net, interrupted.net)
    resumed = _student(seed=123)  # a fresh process would start from other random weights
    res = distill(resumed, EncoderTeacher(teacher), photos, cfg, run_dir=tmp_path / "b", progress=False)
    assert res["steps"] == 6 and _equal_weights(straight.net, resumed.net)
    # Training state: safetensors + JSON only.
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["state.json", "state.safetensors"]
    meta = json.loads((tmp_path / "b" / "state.json").read_text())
    assert meta["step"] == 6 and meta["config"]["distill"]["lr"] == 0.01


def test_resume_refuses_a_run_directory_of_another_configuration(photos, teacher, tmp_path):
    cfg = DistillConfig(steps=2, batch_size=4, device="cpu")
    distill(_student(), EncoderTeacher(teacher), photos, cfg, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        distill(_student(), EncoderTeacher(teacher), photos, cfg.replace(lr=0.1), run_dir=tmp_path, progress=False)


@pytest.fixture(scope="module")
def triplets(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    make_synthetic_nights([(str(i), x) for i, x in enumerate(photos)], out, per_image=8, size=16,
                          kinds=("noise", "blur"), distractor_p=0.3)
    return NightsDataset(read_nights(out, "train"), 16, cache=True)


def _dataset_hinge(enc, ds, margin):
    ref, x0, x1, p = ds.tensors()
    with torch.no_grad():
        e, e0, e1 = enc.embed(ref), enc.embed(x0), enc.embed(x1)
    return hinge_2afc_loss(1 - (e * e0).sum(1), 1 - (e * e1).sum(1), p, margin).item()


def test_finetuning_lowers_the_hinge_loss(triplets):
    enc = _student()
    cfg = FinetuneConfig(steps=40, batch_size=8, lr=5e-3, margin=0.2, device="cpu")
    before = _dataset_hinge(enc, triplets, cfg.margin)
    finetune(enc, triplets, cfg, progress=False)
    assert _dataset_hinge(enc, triplets, cfg.margin) < 0.8 * before


def test_finetuning_resume_is_bitwise(triplets, tmp_path):
    cfg = FinetuneConfig(steps=4, batch_size=4, checkpoint_every=1, edit_p=0.5, device="cpu")
    a, b = _student(), _student()
    finetune(a, triplets, cfg, run_dir=tmp_path / "a", progress=False)
    finetune(b, triplets, cfg, run_dir=tmp_path / "b", progress=False, stop_after=2)
    c = _student(seed=7)
    finetune(c, triplets, cfg, run_dir=tmp_path / "b", progress=False)
    assert _equal_weights(a.net, c.net)


def test_contrastive_baseline_lowers_nt_xent_and_resumes(photos, tmp_path):
    cfg = ContrastiveConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=5, device="cpu")
    torch.manual_seed(0)
    enc = StandardEncoder(STD)
    res = train_contrastive(enc, photos, cfg, run_dir=tmp_path / "s", progress=False)
    (_, first), (_, last) = res["history"]
    assert last < first
    torch.manual_seed(0)
    part = StandardEncoder(STD)
    train_contrastive(part, photos, cfg, run_dir=tmp_path / "t", progress=False, stop_after=7)
    torch.manual_seed(1)
    resumed = StandardEncoder(STD)
    train_contrastive(resumed, photos, cfg, run_dir=tmp_path / "t", progress=False)
    assert _equal_weights(enc.net, resumed.net)  # BatchNorm running statistics included


def _ddp_worker(rank, world, port, photos, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    torch.manual_seed(0)
    teacher = StandardEncoder(STD).freeze()
    student = _student()
    distill(student, EncoderTeacher(teacher), photos, DistillConfig(steps=2, batch_size=4, device="cpu"),
            progress=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.net.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.skipif(bool(os.environ.get("ROBRET_SKIP_DDP_TEST")),
                    reason="ROBRET_SKIP_DDP_TEST is set (the test spawns two processes: ~10 s on 2 cores)")
def test_ddp_on_two_cpu_processes_keeps_ranks_identical(photos, tmp_path, monkeypatch):
    import socket
    import types

    import torch.multiprocessing as mp

    # spawn re-runs the parent's __main__ in each child; in a test process that is whatever ran last
    # (a Streamlit script left by AppTest, a test runner's worker): give the children an empty one.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, photos, str(tmp_path)), nprocs=2, join=True)
    from safetensors.torch import load_file

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.allclose(w0[k], w1[k]) for k in w0)
    assert not all(torch.equal(w0[k], v) for k, v in _student().net.state_dict().items())


def test_retrieval_margin_loss_equals_a_loop_over_the_batch():
    from encoder.train.distill import retrieval_margin_loss

    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 6, 5, generator=g)
    images = torch.tensor([0, 1, 1, 2, 3, 3])
    margin = 0.3

    def unit(x):
        f = torch.cat([x, torch.ones(1)])
        return f / f.norm()

    terms = []
    for i in range(6):
        s = [float(unit(x2[i]) @ unit(x1[j])) for j in range(6)]
        negatives = [s[j] for j in range(6) if images[j] != images[i]]
        terms.append(max(0.0, margin - (s[i] - max(negatives))))
    got = retrieval_margin_loss(x1, x2, images, margin)
    assert got.item() == pytest.approx(sum(terms) / 6, rel=1e-6)
    # Rows with no other image in the batch add nothing; a batch of one image gives 0 (and a gradient).
    x1.requires_grad_(True)
    same = retrieval_margin_loss(x1, x2, torch.zeros(6, dtype=torch.long), margin)
    same.backward()
    assert same.item() == 0.0 and torch.equal(x1.grad, torch.zeros_like(x1))


def test_retrieval_term_widens_the_certified_top1_gap_of_the_training_views(photos, teacher):
    # The margin m on S_ii − max_j S_ij is a certified top-1 radius of ≥ m/(2L) (encoder.train.distill's
    # doc): checked against the production certificate, and the term must actually widen the gaps.
    from encoder.certify import certify_topk
    from encoder.data.augment import random_edit, random_resized_crop

    cfg = DistillConfig(steps=40, batch_size=8, warmup_steps=3, view2="edit", device="cpu")
    plain, widened = _student(), _student()
    distill(plain, EncoderTeacher(teacher), photos, cfg, progress=False)
    distill(widened, EncoderTeacher(teacher), photos, cfg.replace(retrieval_weight=1.0, retrieval_margin=0.5),
            progress=False)
    g = torch.Generator().manual_seed(9)
    gallery = torch.stack([random_resized_crop(p, 16, g, scale=(0.3, 0.6)) for p in photos for _ in range(2)])
    queries = torch.stack([random_edit(x, g, max_strength=0.3) for x in gallery])
    owner = torch.arange(len(photos)).repeat_interleave(2)
    gaps = {}
    for name, enc in (("plain", plain.freeze()), ("widened", widened.freeze())):
        eg, eq = enc.embed(gallery), enc.embed(queries)
        s = eq @ eg.T
        other = owner[:, None] != owner[None, :]
        gap = s.diagonal() - s.masked_fill(~other, float("-inf")).max(1).values
        gaps[name] = gap.mean().item()
        for i in range(len(gallery)):
            keep = other[i].clone()
            keep[i] = True
            if gap[i] > 0:  # the own crop is top-1 among the other photos' crops: radius ≥ gap/(2L)
                r = certify_topk(eq[i], eg[keep], 1, enc.lipschitz).set_radius
                assert r >= gap[i].item() / 2 - 1e-6
    assert gaps["widened"] > gaps["plain"] + 0.01, gaps
