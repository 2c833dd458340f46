"""Attacks on rankings: every attack moves its objective the right way and stays in its threat set."""
from __future__ import annotations

import pytest
import torch

from retrieval.attacks import (ATTACKS, NearestNeighbourClassifier, PGDConfig, autoattack_targeted,
                               autoattack_untargeted, misrank_top1, perturbation_norm, pgd, run_attack,
                               topk_targeted, topk_untargeted)

from _adversarial_fixtures import encoder, gallery_embeddings, small_benchmark

TINY = "lipsim:cpu-tiny"
# robrank's reported number per attack, and the direction a successful attack moves it
DIRECTION = {
    "CA+": ("prank", -1), "CA-": ("prank", +1), "QA+": ("prank", -1), "QA-": ("prank", +1),
    "SPQA+": ("prank", -1), "SPQA-": ("prank", +1), "ES": ("shift", +1), "TMA": ("cosine", +1),
    "LTM": ("recall@1", -1), "GTM": ("recall@1", -1), "GTT": ("retain@4", -1),
}


def _assert_in_threat_set(x_adv, x, config):
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    norms = perturbation_norm(x_adv - x, config.norm)
    assert float(norms.max()) <= config.eps * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("random_start,restarts", [(False, 1), (True, 2)])
def test_pgd_stays_in_ball_and_box_and_never_ends_above_the_clean_objective(norm, eps, random_start, restarts):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g)
    target = torch.rand(4, 3, 8, 8, generator=g)
    config = PGDConfig(norm=norm, eps=eps, steps=10, random_start=random_start, restarts=restarts)
    calls = []
    out = pgd(x0, lambda x: ((x - target) ** 2).flatten(1).sum(1), config,
              callback=lambda step, total, loss: calls.append((step, total)), generator=g)
    _assert_in_threat_set(out.x_adv, x0, config)
    assert bool((out.loss <= out.clean_loss).all()) and bool((out.loss < out.clean_loss).all())
    assert calls[-1] == (10 * restarts, 10 * restarts) and len(calls) == 10 * restarts


def test_pgd_l2_uses_the_whole_budget_on_a_linear_objective():
    x0 = torch.full((2, 3, 4, 4), 0.5)
    w = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    config = PGDConfig(norm="l2", eps=0.3, steps=20)
    out = pgd(x0, lambda x: (w * x).flatten(1).sum(1), config)
    assert torch.allclose(perturbation_norm(out.x_adv - x0, "l2"), torch.full((2,), 0.3), atol=1e-4)


@pytest.mark.parametrize("name", ATTACKS)
def test_each_robrank_attack_moves_its_objective_and_number_the_right_way(name):
    ds = small_benchmark()
    enc, gallery = encoder(TINY), gallery_embeddings(TINY)
    config = PGDConfig(norm="linf", eps=8 / 255, step=2 / 255, steps=6)
    gen = torch.Generator().manual_seed(0)
    if name.startswith("CA"):
        idx = torch.arange(6)
        res = run_attack(name, enc, ds.gallery[idx], gallery, ds.gallery_labels[idx], ds.gallery_labels,
                         self_index=idx, config=config, generator=gen)
        x = ds.gallery[idx]
    else:
        x = ds.queries[:6]
        res = run_attack(name, enc, x, gallery, ds.query_labels[:6], ds.gallery_labels, config=config, generator=gen)
    _assert_in_threat_set(res.x_adv, x, config)
    assert float(res.loss.mean()) < float(res.clean_loss.mean()), "the objective did not decrease"
    key, sign = DIRECTION[name]
    assert sign * (res.after[key] - res.before[key]) >= 0, (res.before, res.after)


def test_attacks_honour_an_l2_threat_model_too():
    ds = small_benchmark()
    config = PGDConfig(norm="l2", eps=0.25, steps=5)
    res = run_attack("GTT", encoder(TINY), ds.queries[:4], gallery_embeddings(TINY), config=config)
    _assert_in_threat_set(res.x_adv, ds.queries[:4], config)


def test_topk_untargeted_lowers_overlap_and_reports_progress():
    ds = small_benchmark()
    steps = []
    config = PGDConfig(norm="l2", eps=4.0, steps=15)
    res = topk_untargeted(encoder("pixels"), ds.queries[:3], gallery_embeddings("pixels"), k=3, config=config,
                          callback=lambda step, total, loss: steps.append(step))
    assert steps == list(range(1, 16))
    _assert_in_threat_set(res.x_adv, ds.queries[:3], config)
    assert torch.allclose(res.l2, perturbation_norm(res.x_adv - ds.queries[:3], "l2"))
    assert float(res.overlap.mean()) < 1.0


def test_topk_targeted_pushes_the_chosen_item_into_the_topk():
    ds = small_benchmark()
    gallery = gallery_embeddings("pixels")
    q = ds.queries[:1]
    scores = (gallery_embeddings("pixels") @ encoder("pixels").embed(q)[0])
    target = int(scores.argsort()[len(scores) // 2])  # a middle-ranked item
    config = PGDConfig(norm="l2", eps=6.0, steps=25)
    res = topk_targeted(encoder("pixels"), q, gallery, target, k=3, config=config)
    _assert_in_threat_set(res.x_adv, q, config)
    assert target not in res.clean_topk[0].tolist()
    assert bool(res.success[0]) and target in res.adv_topk[0].tolist()


def test_misrank_top1_breaks_recall_at_large_eps_only():
    ds = small_benchmark()
    enc, gallery = encoder(TINY), gallery_embeddings(TINY)
    x, y = ds.queries[:4], ds.query_labels[:4]
    _, hit0 = misrank_top1(enc, x, gallery, y, ds.gallery_labels, config=PGDConfig(norm="l2", eps=0.0, steps=1))
    x_adv, hit = misrank_top1(enc, x, gallery, y, ds.gallery_labels, config=PGDConfig(norm="l2", eps=3.0, steps=10))
    assert hit.sum() < hit0.sum()
    assert float(perturbation_norm(x_adv - x, "l2").max()) <= 3.0 + 1e-4


def test_nearest_neighbour_classifier_scores_a_class_by_its_best_item():
    ds = small_benchmark()
    enc, gallery = encoder("pixels"), gallery_embeddings("pixels")
    labels = ds.gallery_labels % 5 + 10  # five classes, labels 10..14
    clf = NearestNeighbourClassifier(enc, gallery, labels, tau=0.1)
    with torch.no_grad():
        logits = clf(ds.queries[:3])
        s = encoder("pixels").embed(ds.queries[:3]) @ gallery.T / 0.1
    assert logits.shape == (3, 5)
    for c in range(5):
        assert torch.allclose(logits[:, c], s[:, labels == 10 + c].amax(1), atol=1e-5)
    assert clf.class_of(torch.tensor([12])).tolist() == [2]


def test_autoattack_untargeted_moves_the_top1_within_its_norm():
    ds = small_benchmark()
    x = ds.queries[:4]
    seen = []
    x_adv, hit = autoattack_untargeted(encoder(TINY), x, gallery_embeddings(TINY), norm="L2", eps=3.0,
                                       version="custom", attacks=["apgd-ce"], n_iter=10,
                                       callback=lambda done, total, _: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert float(perturbation_norm(x_adv - x, "l2").max()) <= 3.0 + 1e-3
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert hit.sum() < 4  # with ε this large the top-1 moves


def test_autoattack_targeted_brings_the_chosen_item_to_the_top():
    ds = small_benchmark()
    x = ds.queries[:2]
    gallery = gallery_embeddings(TINY)
    target = int((encoder(TINY).embed(x)[0] @ gallery.T).argsort()[-3])  # third-best item of query 0
    x_adv, ok = autoattack_targeted(encoder(TINY), x, gallery, target, norm="L2", eps=4.0, n_iter=20)
    assert float(perturbation_norm(x_adv - x, "l2").max()) <= 4.0 + 1e-3
    assert bool(ok[0])
