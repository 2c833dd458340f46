"""Robust deep metric learning (encoder.train.robdml): every loss term against a hand computation,
the miners against brute force, the hardness manipulation's direction and threat set, resuming,
the command line, and robdml:demo through the registry."""
from __future__ import annotations

import math

import pytest
import torch

from encoder.attack import PGDConfig
from encoder.standard import StandardConfig, StandardEncoder
from encoder.train.robdml import (RegionClasses, RobDMLConfig, hardness, hm_loss, ics_loss, lga_destination,
                                  manipulate_hardness, mine_random, mine_semihard, mine_softhard, pairwise_distances,
                                  spc2_batch, train_robdml, triplet_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# Loss terms ------------------------------------------------------------------------------------------
def test_hardness_and_triplet_loss_match_a_hand_computation():
    a = _unit([1, 0], [1, 0])
    p = _unit([0, 1], [0, 1])
    n = _unit([-1, 0], [0.6, 0.8])
    # triplet 1: d(a,p) = √2, d(a,n) = 2; triplet 2: d(a,n) = √(0.4² + 0.8²) = √0.8
    h = hardness(a, p, n)
    assert torch.allclose(h, torch.tensor([math.sqrt(2) - 2, math.sqrt(2) - math.sqrt(0.8)], dtype=torch.float64))
    # max(0, √2 − 2 + 0.2) = 0 and max(0, √2 − √0.8 + 0.2) = 0.71978…
    expected = (0 + (math.sqrt(2) - math.sqrt(0.8) + 0.2)) / 2
    assert triplet_loss(a, p, n, 0.2).item() == pytest.approx(expected, abs=1e-12)


def test_hm_loss_is_the_squared_shortfall_below_the_destination_hardness():
    h_src = torch.tensor([-0.5, 0.1, -0.2])
    assert torch.allclose(hm_loss(h_src, -0.2), torch.tensor([0.09, 0.0, 0.0]))
    assert torch.allclose(hm_loss(h_src, torch.tensor([0.0, 0.3, -1.0])), torch.tensor([0.25, 0.04, 0.0]))


@pytest.mark.parametrize("previous, expected", [(2.0, -0.2), (0.2, -0.2), (0.1, -0.1), (0.05, -0.05), (0.0, 0.0),
                                                (-0.3, 0.0)])
def test_linear_gradual_adversary_follows_the_previous_loss_capped_at_the_margin(previous, expected):
    assert lga_destination(previous, 0.2) == pytest.approx(expected, abs=1e-15)


def test_ics_loss_matches_a_hand_computation():
    a = _unit([1, 0], [1, 0])
    adv = _unit([0.8, 0.6], [-1, 0])
    p = _unit([0, 1], [0, 1])
    # d(a, ã) = √0.4 < √2 = d(a, p) → 0;  d(a, ã) = 2 → 2 − √2
    assert ics_loss(a, adv, p).item() == pytest.approx((2 - math.sqrt(2)) / 2, abs=1e-12)


def test_pairwise_distances_match_cdist():
    z = torch.nn.functional.normalize(torch.randn(9, 5, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64), dim=1)
    assert torch.allclose(pairwise_distances(z), torch.cdist(z, z), atol=1e-7)


# Miners ---------------------------------------------------------------------------------------------------
def _batch(seed, classes=5, dim=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(2 * classes, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(classes).repeat_interleave(2)
    labels[-2:] = 0  # one class with four members: several positives for anchor 0
    return z, labels


@pytest.mark.parametrize("seed", range(6))
def test_softhard_and_semihard_miners_pick_from_the_sets_robrank_defines(seed):
    z, labels = _batch(seed)
    d = torch.cdist(z, z)
    g = torch.Generator().manual_seed(seed)
    anc, pos, neg = mine_softhard(z, labels, g)
    assert anc.tolist() == list(range(0, 10, 2))
    for a, p, n in zip(anc.tolist(), pos.tolist(), neg.tolist()):
        positives = [j for j in range(10) if labels[j] == labels[a] and j != a]
        negatives = [j for j in range(10) if labels[j] != labels[a]]
        soft_neg = [j for j in negatives if d[a, j] < max(d[a, k] for k in positives)]
        soft_pos = [j for j in positives if d[a, j] > min(d[a, k] for k in negatives)]
        assert n in (soft_neg or negatives) and p in (soft_pos or positives)
    anc, pos, neg = mine_semihard(z, labels, g, margin=0.2)
    for a, p, n in zip(anc.tolist(), pos.tolist(), neg.tolist()):
        assert p == a + 1
        negatives = [j for j in range(10) if labels[j] != labels[a]]
        semi = [j for j in negatives if d[a, p] < d[a, j] < d[a, p] + 0.2]
        assert n in (semi or negatives)
    anc, pos, neg = mine_random(z, labels, g)
    assert (pos == anc + 1).all() and (labels[neg] != labels[anc]).all()


def test_miners_refuse_a_batch_of_one_class():
    z, _ = _batch(0)
    with pytest.raises(ValueError, match="no candidate"):
        mine_softhard(z, torch.zeros(10, dtype=torch.long), torch.Generator())


# Hardness manipulation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cnn():
    torch.manual_seed(0)
    return StandardEncoder(StandardConfig(input_size=16, widths=(8, 16), embed_dim=8)).freeze()


def _triplets(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 16, 16, generator=g) for _ in range(3)]


def test_hardness_manipulation_raises_hardness_towards_the_destination_inside_the_threat_set(tiny_cnn):
    a, p, n = _triplets()
    with torch.no_grad():
        h0 = hardness(tiny_cnn.embed(a), tiny_cnn.embed(p), tiny_cnn.embed(n))
    h_dst = h0 + 0.05  # every triplet asked to become harder by 0.05
    eps = 8 / 255
    cfg = PGDConfig(norm="linf", eps=eps, step=1 / 255, steps=16, stop_at=0.0)
    xa, xp, xn, after, before = manipulate_hardness(tiny_cnn.embed, a, p, n, h_dst, cfg)
    with torch.no_grad():
        h1 = hardness(tiny_cnn.embed(xa), tiny_cnn.embed(xp), tiny_cnn.embed(xn))
    assert torch.allclose(before, hm_loss(h0, h_dst), atol=1e-6)
    assert (h1 > h0).all()  # moved the stated way: harder
    assert (after < before).all() and torch.allclose(after, hm_loss(h1, h_dst), atol=1e-5)
    assert (h1 <= h_dst + 0.05).all()  # no overshoot beyond what a single step can carry
    for x, x0 in ((xa, a), (xp, p), (xn, n)):
        assert (x - x0).abs().max() <= eps + 1e-7 and x.min() >= 0 and x.max() <= 1


def test_hardness_manipulation_leaves_triplets_already_at_the_destination_untouched(tiny_cnn):
    a, p, n = _triplets(seed=1)
    with torch.no_grad():
        h0 = hardness(tiny_cnn.embed(a), tiny_cnn.embed(p), tiny_cnn.embed(n))
    h_dst = torch.where(torch.arange(6) % 2 == 0, h0 - 0.1, h0 + 0.05)  # even rows are already harder
    xa, xp, xn, after, before = manipulate_hardness(tiny_cnn.embed, a, p, n, h_dst,
                                                    PGDConfig(norm="linf", eps=8 / 255, step=1 / 255, steps=4))
    even = torch.arange(0, 6, 2)
    assert torch.equal(xa[even], a[even]) and torch.equal(xn[even], n[even]) and (before[even] == 0).all()
    assert not torch.equal(xa[1::2], a[1::2])


# Training --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def region_classes():
    from encoder.samples import DEMO_TRAIN_PHOTOS, sample_photo

    photos = []
    for name in DEMO_TRAIN_PHOTOS[:3]:
        im = sample_photo(name).convert("RGB")
        im.thumbnail((96, 96))
        photos.append(im)
    return RegionClasses(photos, 16, regions_per_photo=4)


def test_spc2_batches_pair_two_images_of_each_class(region_classes):
    images, labels = spc2_batch(region_classes, 0, 3, 8, range(4))
    assert images.shape == (8, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(labels[0::2], labels[1::2]) and labels[0::2].unique().numel() == 4
    again, _ = spc2_batch(region_classes, 0, 3, 8, range(4))
    assert torch.equal(images, again)  # a pure function of (seed, step, position)


def _fresh(seed=0):
    torch.manual_seed(seed)
    return StandardEncoder(StandardConfig(input_size=16, widths=(8, 16), embed_dim=8))


TINY_CFG = RobDMLConfig(steps=4, batch_size=8, pgd_steps=2, warmup_steps=1, checkpoint_every=2, device="cpu")


def test_training_is_resumable_bitwise_including_the_gradual_adversarys_previous_loss(region_classes, tmp_path):
    whole = _fresh()
    res = train_robdml(whole, region_classes, TINY_CFG, run_dir=tmp_path / "whole", progress=False)
    assert [r["step"] for r in res["trace"]] == [0, 1, 2, 3]
    # g_LGA reads the previous step's adversarial triplet loss (2.0 before the first step)
    assert res["trace"][0]["h_destination"] == pytest.approx(-0.2)
    for prev, cur in zip(res["trace"], res["trace"][1:]):
        assert cur["h_destination"] == pytest.approx(lga_destination(prev["triplet"], 0.2))
    part = _fresh()
    train_robdml(part, region_classes, TINY_CFG, run_dir=tmp_path / "part", progress=False, stop_after=2)
    part = _fresh(seed=5)  # different initial weights: everything must come from the state
    train_robdml(part, region_classes, TINY_CFG, run_dir=tmp_path / "part", progress=False)
    a, b = whole.net.state_dict(), part.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _benign_loss(enc, batches) -> float:
    """The softhard triplet loss (margin 0.2) on fixed SPC-2 batches, benign images, eval mode."""
    total = 0.0
    with torch.no_grad():
        for x, labels in batches:
            z = enc.embed(x)
            a, p, n = mine_softhard(z, labels, torch.Generator().manual_seed(0))
            total += float(triplet_loss(z[a], z[p], z[n], 0.2))
    return total / len(batches)


def test_a_short_run_lowers_the_loss_and_the_adversary_raises_ers_over_the_same_run_without_it(region_classes):
    """Same init, data and steps; with and without hardness manipulation. ERS on the held-out
    near-duplicate benchmark at 16 px (robrank's suite, ℓ∞ 8/255, 8 PGD steps).

    Deterministic (one thread, seeded), but at this scale the effect is not seed-proof: over init
    seeds 0–4 the adversary raised ERS for 4 (25.7/25.3, 19.2/12.9, 27.4/17.0, 19.8/14.7) and lowered
    it for seed 1 (20.3/22.6); the benign loss fell in all ten runs. Seed 2 is pinned here as a
    regression check of the whole pipeline; the evidence of the effect is the benchmark
    (docs/benchmarks.md: ERS 68.4 for robdml:demo against 42.6 for standard:demo)."""
    from retrieval.attacks import ROBRANK_LINF, robrank_suite
    from retrieval.bench_data import heldout_benchmark

    ds = heldout_benchmark(16, crops_per_photo=2, distractors_per_photo=1)
    batches = [spc2_batch(region_classes, 99, s, 24, range(12)) for s in range(3)]
    suite_cfg = ROBRANK_LINF.replace(steps=8, step=2 / 255)
    ers = {}
    for adversary in (True, False):
        enc = _fresh(seed=2)
        before = _benign_loss(enc.eval(), batches)
        cfg = RobDMLConfig(steps=30, batch_size=16, pgd_steps=4, pgd_step=4 / 255, warmup_steps=2, lr=2e-3,
                           adversary=adversary, seed=2, device="cpu")
        train_robdml(enc, region_classes, cfg, progress=False)
        enc.freeze()
        assert _benign_loss(enc, batches) < before
        ers[adversary] = robrank_suite(enc, ds.queries, ds.query_labels, ds.gallery, ds.gallery_labels,
                                       config=suite_cfg, seed=0, batch_size=64).ers
    assert ers[True] > ers[False] + 2, ers


# Command line and registry ------------------------------------------------------------------------------------
def _robret(*args) -> int:
    from retrieval.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """class/image.png: three classes of two 24-px crops each, and a tiny standard CNN to start from."""
    from encoder.samples import DEMO_TRAIN_PHOTOS, sample_photo
    from encoder.standard import save_standard

    root = tmp_path_factory.mktemp("robdml-cli")
    for name in DEMO_TRAIN_PHOTOS[:3]:
        im = sample_photo(name).convert("RGB")
        im.thumbnail((48, 48))
        (root / "classes" / name).mkdir(parents=True)
        im.crop((0, 0, 24, 24)).save(root / "classes" / name / "a.png")
        im.crop((8, 8, 32, 32)).save(root / "classes" / name / "b.png")
    save_standard(_fresh().freeze(), root / "init.safetensors", provenance={"test": True})
    return root


def test_train_robdml_on_a_labelled_folder_writes_a_robdml_checkpoint_with_provenance(labelled_folder):
    from encoder import load_encoder
    from encoder.standard import read_standard_header

    root = labelled_folder
    out = root / "robust.safetensors"
    assert _robret("train", "robdml", root / "classes", "--init", root / "init.safetensors", "--out", out,
                   "--steps", 2, "--batch-size", 6, "--pgd-steps", 2, "--eps", "8/255", "--device", "cpu",
                   "--no-progress") == 0
    prov = read_standard_header(out)["provenance"]
    assert prov["command"].startswith("robret train robdml") and prov["classes"] == {"kind": "folder", "count": 3}
    assert prov["config"]["eps"] == pytest.approx(8 / 255) and prov["config"]["pgd_steps"] == 2
    enc = load_encoder(f"robdml:{out}")
    assert enc.name == "robdml:robust" and enc.lipschitz is None and enc.pretrained
    init = load_encoder(f"standard:{root / 'init.safetensors'}")
    assert not torch.equal(enc.net.head.weight, init.net.head.weight)  # it trained


@pytest.mark.parametrize("args, message", [
    (["--out", "x.safetensors"], "needs IMAGES"),
    (["{root}/classes", "--out", "x.safetensors", "--eps", "8"], "exceeds the [0, 1] pixel range"),
    (["{root}/missing", "--out", "x.safetensors", "--init", "{root}/init.safetensors"], "labelled folder not found"),
    (["{root}/classes", "--out", "x.safetensors", "--init", "lipsim:cpu-tiny"], "trains the standard CNN"),
    (["{root}/classes", "--demo", "--no-ship"], "--demo trains on the bundled photos"),
])
def test_train_robdml_refuses_bad_input_with_one_line(labelled_folder, capsys, args, message):
    code = _robret("train", "robdml", *[a.format(root=labelled_folder) for a in args], "--device", "cpu",
                   "--no-progress")
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1


def test_train_robdml_refuses_an_unparsable_budget_at_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        _robret("train", "robdml", "--demo", "--eps", "eight")
    assert exc.value.code == 2 and "not a number" in capsys.readouterr().err


def test_robdml_demo_is_bundled_registered_and_carries_its_provenance():
    from encoder import list_encoders, load_encoder
    from encoder.registry import bundled_weights
    from encoder.standard import read_standard_header

    assert "robdml:demo" in list_encoders()
    enc = load_encoder("robdml:demo")
    std = load_encoder("standard:demo")
    assert enc.name == "robdml:demo" and enc.lipschitz is None and enc.pretrained
    # robdml:demo was trained from the 64 px standard:demo shipped before issue 17's retrain (standard:demo64);
    # today's standard:demo is the 128 px retrain: same width, other input.
    assert enc.dim == std.dim and enc.input_size == 64
    prov = read_standard_header(bundled_weights("robdml")["demo"])["provenance"]
    assert prov["command"] == "robret train robdml --demo" and prov["init"]["spec"] == "standard:demo"
    # its init is the 64 px standard:demo of before the retrain, still bundled as standard:demo64
    import hashlib

    assert prov["init"]["sha256"] == hashlib.sha256(bundled_weights("standard")["demo64"].read_bytes()).hexdigest()
    assert load_encoder("standard:demo64").input_size == enc.input_size
    assert "PGD 4 iterations" in prov["deviations"] and prov["plan"]["robdml"]["steps"] == 400
    assert prov["training"]["steps"] == 400
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(enc.embed(x).norm(dim=1), torch.ones(2))


def test_the_ui_can_pick_robdml_demo_as_its_comparison_encoder():
    from ui.backend import pick_compare
    from ui.config import UIConfig

    spec, enc, notes = pick_compare(UIConfig(compare="robdml:demo"))
    assert spec == "robdml:demo" and enc.name == "robdml:demo" and not notes
