"""`robret dedup`: exact and near-duplicate groups from the stored vectors, with certified verdicts.

A folder with planted duplicates (an exact copy in a subfolder, a noisy copy, a JPEG re-encode, a
downscaled copy) is indexed with lipsim:cpu-tiny; the groups and pairs are checked against an
all-pairs computation, the radii against the formula of retrieval/dedup.py, and the certificate
against PGD on one image of a pair: a certified verdict never flips, a near-threshold one does."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _index_fixtures import copy_photos
from retrieval.cli import main
from retrieval.schema import SCHEMA_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")

T = 0.999
PLANTED = [{"coffee.png", "sub/coffee-copy.png"}, {"chelsea.png", "chelsea-noisy.png"},
           {"rocket.png", "sub/rocket.jpg"}, {"astronaut.png", "astronaut-small.png"}]


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory, sample_folder, tiny_lipsim):
    from index import IngestOptions, build_index

    base = tmp_path_factory.mktemp("dedup")
    folder = copy_photos(sample_folder, base / "photos",
                         ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "page"))
    (folder / "sub").mkdir()
    (folder / "sub" / "coffee-copy.png").write_bytes((folder / "coffee.png").read_bytes())
    a = np.asarray(Image.open(folder / "chelsea.png")).astype(float)
    noisy = np.clip(a + np.random.default_rng(0).normal(0, 3, a.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(folder / "chelsea-noisy.png")
    Image.open(folder / "rocket.png").save(folder / "sub" / "rocket.jpg", quality=85)
    Image.open(folder / "astronaut.png").resize((384, 384), Image.BICUBIC).save(folder / "astronaut-small.png")
    build_index(folder, base / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=2))
    return folder, base / "index"


def _report(index_dir, threshold=T, eps=None):
    from index import Gallery
    from retrieval.dedup import find_duplicates

    with Gallery.open(index_dir, use_gpu=False) as g:
        return find_duplicates(g, threshold, eps)


def test_planted_exact_and_near_duplicates_are_grouped_as_an_all_pairs_search_finds_them(dup_index):
    from index import Gallery

    _, index_dir = dup_index
    report = _report(index_dir)
    groups = [{report.paths[i] for i in g} for g in report.groups]
    assert sorted(groups, key=sorted) == sorted(PLANTED, key=sorted)
    exact = [(report.paths[p.a], report.paths[p.b]) for p in report.pairs if p.exact]
    assert [set(e) for e in exact] == [{"coffee.png", "sub/coffee-copy.png"}]
    assert report.pairs[0].exact  # exact duplicates come first
    # Independent all-pairs computation in float64 over the stored vectors.
    with Gallery.open(index_dir, use_gpu=False) as g:
        ids, v = g.all_vectors()
    s = v.astype(np.float64) @ v.astype(np.float64).T
    want = {(int(ids[i]), int(ids[j])) for i in range(len(ids)) for j in range(i + 1, len(ids)) if s[i, j] >= T}
    got = {(p.a, p.b) for p in report.pairs}
    assert {tuple(sorted(x)) for x in got} == {tuple(sorted(x)) for x in want}
    pos = {int(i): n for n, i in enumerate(ids)}
    for p in report.pairs:
        assert p.duplicate and p.score == pytest.approx(s[pos[p.a], pos[p.b]], abs=1e-12)
    # A lower threshold merges more: groups stay the connected components of the pair graph.
    loose = _report(index_dir, threshold=0.99)
    members = [set(g) for g in loose.groups]
    for p in loose.pairs:
        assert any({p.a, p.b} <= m for m in members)
    assert sum(len(m) for m in members) == len(set().union(*members))  # disjoint


def test_radius_is_the_stated_formula_with_exact_resize_norms(dup_index):
    from encoder.certify import slack_for
    from encoder.preprocess import resize_matrix
    from index import Gallery

    _, index_dir = dup_index
    report = _report(index_dir, eps=0.001)
    with Gallery.open(index_dir, use_gpu=False) as g:
        recs = {int(i): r for i, r in zip(g.ids(), g.records(g.ids()))}
        slack = slack_for(g.float_error, max(1.0, g.max_norm))
    assert report.slack == slack and report.channel_lipschitz == pytest.approx(math.sqrt(6))

    def n(i):  # √6 (grey + alpha: the largest channel constant) × σ_max(R_h)·σ_max(R_w)
        r = recs[i]
        return math.sqrt(6) * np.linalg.norm(resize_matrix(r.height, 32), 2) * np.linalg.norm(resize_matrix(r.width, 32), 2)

    for p in report.pairs + report.near_misses:
        expected = max(0.0, abs(p.score - T) - slack) / (n(p.a) + n(p.b))
        assert p.radius == pytest.approx(expected, rel=1e-4)
        assert p.certified == (p.radius > 0.001)


def _attack_score(encoder, path, other_vector, eps, steps=40):
    """PGD (ℓ2, ε over the file's own samples) minimising ⟨e(x'), e_b⟩; returns (clean, attacked) scores
    computed with the gallery's embedding path."""
    from encoder.attack import PGDConfig, pgd
    from retrieval.attacks import ImageEmbedder, query_image

    q = query_image(Image.open(path))
    emb = ImageEmbedder(encoder, layout=q.layout)
    target = torch.from_numpy(np.asarray(other_vector, dtype=np.float32))
    x0 = q.x[None]
    out = pgd(x0, lambda x: emb(x) @ target, PGDConfig(norm="l2", eps=eps, steps=steps))
    assert float((out.x_adv - x0).norm()) <= eps * (1 + 1e-5)
    clean = float(emb.embed(x0)[0].double() @ target.double())
    attacked = float(emb.embed(out.x_adv)[0].double() @ target.double())
    return clean, attacked


def test_pgd_cannot_flip_a_certified_duplicate_but_flips_an_uncertified_near_threshold_pair(dup_index, tiny_lipsim):
    """Two different photos (astronaut, coffee) with score s: at T = s − 0.01 they are a certified duplicate
    up to their radius, and PGD on the astronaut at 0.95·radius lowers s by at most L·n_a·ε (the proof's
    bound for one image) and stays ≥ T; at T = s − 0.0001 the verdict is not certified at ε = 1, and PGD
    at that budget flips it."""
    from index import Gallery

    folder, index_dir = dup_index
    with Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=False) as g:
        by_path = {r.path: int(i) for i, r in zip(g.ids(), g.records(g.ids()))}
        a, b = by_path["astronaut.png"], by_path["coffee.png"]
        e_b = g.vectors(np.array([b]))[0]
        s = float(g.vectors(np.array([a]))[0].astype(np.float64) @ e_b.astype(np.float64))
    assert s < T  # not a duplicate at the default threshold
    n_a = tiny_lipsim.input_norm((512, 512), "RGB")

    t_far = s - 0.01
    pair = next(p for p in _report(index_dir, threshold=t_far).pairs if {p.a, p.b} == {a, b})
    eps = 0.95 * pair.radius
    clean, attacked = _attack_score(tiny_lipsim, folder / "astronaut.png", e_b, eps)
    assert clean == pytest.approx(s, abs=1e-5)
    assert clean - attacked <= n_a * eps + 1e-5
    assert clean - attacked > 0  # the attack did push (a random-weight model moves far less than the bound)
    assert attacked >= t_far

    t_near = s - 1e-4
    near = next(p for p in _report(index_dir, threshold=t_near, eps=1.0).pairs if {p.a, p.b} == {a, b})
    assert near.duplicate and not near.certified and near.radius < 0.01
    _, flipped = _attack_score(tiny_lipsim, folder / "astronaut.png", e_b, 1.0)
    assert flipped < t_near  # the verdict changed: it was not certified, and it was not robust


def test_near_misses_list_every_uncertified_non_duplicate(dup_index):
    from index import Gallery

    _, index_dir = dup_index
    eps = 0.05
    report = _report(index_dir, eps=eps)
    with Gallery.open(index_dir, use_gpu=False) as g:
        ids, v = g.all_vectors()
    s = v.astype(np.float64) @ v.astype(np.float64).T
    listed = {frozenset((p.a, p.b)) for p in report.near_misses}
    dup = {frozenset((p.a, p.b)) for p in report.pairs}
    norms = {}
    from retrieval.dedup import pair_radius

    with Gallery.open(index_dir, use_gpu=False) as g:
        for i, r in zip(g.ids(), g.records(g.ids())):
            norms[int(i)] = math.sqrt(6) * g.encoder.input_norm((r.height, r.width))
    for x in range(len(ids)):
        for y in range(x + 1, len(ids)):
            pair = frozenset((int(ids[x]), int(ids[y])))
            if pair in dup:
                continue
            r = pair_radius(s[x, y], T, 1.0, norms[int(ids[x])], norms[int(ids[y])], report.slack)
            assert (pair in listed) == (r <= eps), (pair, r)
    assert all(not p.duplicate and p.certified is False for p in report.near_misses)


def test_dedup_command_prints_json_csv_and_a_table(dup_index, capsys):
    _, index_dir = dup_index
    assert main(["dedup", str(index_dir), "--threshold", str(T), "--certify-eps", "0.001", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == SCHEMA_VERSION and doc["command"] == "dedup" and doc["threshold"] == T
    assert sorted(({m["path"] for m in g} for g in doc["groups"]), key=sorted) == sorted(PLANTED, key=sorted)
    assert all(len(m["sha256"]) == 64 for g in doc["groups"] for m in g)
    assert main(["dedup", str(index_dir), "--threshold", str(T), "--certify-eps", "0.001", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(doc["pairs"]) + len(doc["near_misses"])
    assert {(r["a_path"], r["b_path"]) for r in rows if r["duplicate"] == "True"} == {
        (p["a_path"], p["b_path"]) for p in doc["pairs"]}
    assert main(["dedup", str(index_dir), "--threshold", str(T)]) == 0
    out = capsys.readouterr().out
    assert "4 group(s)" in out and "sub/coffee-copy.png" in out and "exact" in out


@pytest.mark.parametrize("argv,message", [(["--threshold", "1.5"], "between 0 and 1"),
                                          (["--certify-eps", "-1"], "finite number ≥ 0"),
                                          (["--json", "--csv"], "not allowed with")])
def test_dedup_bad_arguments_exit_2(dup_index, capsys, argv, message):
    _, index_dir = dup_index
    with pytest.raises(SystemExit) as exc:
        main(["dedup", str(index_dir), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
