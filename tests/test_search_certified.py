"""Certified search over a gallery, and the `robret query` / `robret index` commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoder.certify import certify_topk_bruteforce
from encoder.preprocess import pil_to_tensor, resize
from index import Gallery
from retrieval.cli import main
from retrieval.search import search_embedding, search_image


def test_certified_search_equals_bruteforce_certificate_in_query_pixels(photo_index, tiny_lipsim):
    folder, index_dir = photo_index
    query = folder / "chelsea.png"
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        res = search_image(g, query, k=4, eps=1e-3)
        ids, vecs = g.all_vectors()
        q = g.embed_images([g.decode(query).image])[0]
    top, radius, set_radius = certify_topk_bruteforce(q, vecs, 4, 1.0, slack=res.slack)
    h, w = res.query_size
    norm = tiny_lipsim.input_norm((h, w))
    assert [hit.id for hit in res.hits] == ids[top].tolist()
    assert res.complete and res.input_norm == pytest.approx(norm)
    assert np.allclose([hit.radius for hit in res.hits], radius / norm, rtol=1e-6)
    assert res.set_radius == pytest.approx(set_radius / norm, rel=1e-6)
    assert res.eps_certified == (res.set_radius > 1e-3)
    assert res.hits[0].path == query and res.hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_short_candidate_list_gives_a_sound_lower_bound(photo_index, tiny_lipsim):
    folder, index_dir = photo_index
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        full = search_image(g, folder / "coffee.png", k=3)
        short = search_image(g, folder / "coffee.png", k=3, candidates=4)
    assert not short.complete and short.candidates == 4
    assert [h.id for h in short.hits] == [h.id for h in full.hits]
    assert short.set_radius <= full.set_radius + 1e-12
    assert all(s.radius <= f.radius + 1e-12 for s, f in zip(short.hits, full.hits))


def test_excluded_ids_leave_the_answer_and_its_certificate(photo_index, tiny_lipsim):
    folder, index_dir = photo_index
    query = folder / "chelsea.png"
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        full = search_image(g, query, k=3)
        drop = [full.hits[0].id, full.hits[2].id]
        res = search_image(g, query, k=3, exclude=drop)
        short = search_image(g, query, k=3, exclude=drop, candidates=4)
        ids, vecs = g.all_vectors()
        q = g.embed_images([g.decode(query).image])[0]
    keep = ~np.isin(ids, drop)
    top, radius, set_radius = certify_topk_bruteforce(q, vecs[keep], 3, 1.0, slack=res.slack)
    norm = res.input_norm
    assert [h.id for h in res.hits] == ids[keep][top].tolist() and not set(drop) & {h.id for h in res.hits}
    assert res.complete and np.allclose([h.radius for h in res.hits], radius / norm, rtol=1e-6)
    assert res.set_radius == pytest.approx(set_radius / norm, rel=1e-6)
    assert not short.complete and [h.id for h in short.hits] == [h.id for h in res.hits]
    assert short.set_radius <= res.set_radius + 1e-12


def test_noise_inside_the_certified_radius_never_changes_the_topk(photo_index, tiny_lipsim):
    folder, index_dir = photo_index
    gen = torch.Generator().manual_seed(0)
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        image = g.decode(folder / "astronaut.png").image
        res = search_image(g, image, k=3)
        x = pil_to_tensor(image)
        top = {h.id for h in res.hits}
        for _ in range(8):
            delta = torch.randn(x.shape, generator=gen)
            delta *= 0.99 * res.set_radius / delta.norm()
            with torch.inference_mode():
                e = tiny_lipsim.embed(resize(x + delta, tiny_lipsim.input_size)[None])[0].numpy()
            _, ids = g.search(e, 3, exact=True)
            assert set(ids[0].tolist()) == top


def test_search_embedding_states_radii_at_the_encoder_input(photo_index, tiny_lipsim):
    _, index_dir = photo_index
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        ids, vecs = g.all_vectors()
        res = search_embedding(g, vecs[0], k=2)
        assert res.input_norm == 1.0 and res.radius_space.startswith("encoder input 32")
        plain = search_embedding(g, vecs[0], k=2, certify=False)
    assert plain.set_radius is None and [h.id for h in plain.hits] == [h.id for h in res.hits]
    assert res.hits[0].id == ids[0]


def test_query_command_prints_radii_and_json(photo_index, capsys):
    folder, index_dir = photo_index
    assert main(["query", str(folder / "moon.png"), "--index-dir", str(index_dir), "-k", "3",
                 "--certify-eps", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "radius" in out and "top-3 set certified" in out and "eps 0.001" in out and "moon.png" in out
    assert main(["query", str(folder / "moon.png"), "--index-dir", str(index_dir), "-k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["hits"]) == 3 and data["hits"][0]["path"].endswith("moon.png")
    assert data["set_radius"] > 0 and data["radius_space"].startswith("ℓ2 over the file's 1-channel 8-bit samples (L,")


def test_index_commands_stats_verify_and_errors(photo_index, tmp_path, capsys):
    folder, index_dir = photo_index
    assert main(["index", "verify", str(index_dir)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["index", "stats", str(index_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["files"]["indexed"] == len(list(folder.iterdir())) and stats["encoder"]["spec"] == "lipsim:cpu-tiny"
    assert main(["index", "build", str(tmp_path / "missing"), "--index-dir", str(tmp_path / "i"),
                 "--encoder", "lipsim:cpu-tiny"]) == 2  # a SOURCE that cannot be used is bad input
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", "verify", str(tmp_path)]) == 1  # not an index directory


def test_index_build_command_with_default_encoder_explains_when_demo_is_absent(tmp_path, sample_folder, capsys):
    from encoder.registry import bundled_weights

    if "demo" in bundled_weights("lipsim"):
        pytest.skip("lipsim:demo is bundled")
    assert main(["index", "build", str(sample_folder), "--index-dir", str(tmp_path / "i")]) == 1
    err = capsys.readouterr().err
    assert "lipsim:demo" in err and "--encoder" in err


def test_radii_are_also_stated_as_an_rms_change_per_sample_in_grey_levels(photo_index, tiny_lipsim):
    folder, index_dir = photo_index
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        res = search_image(g, folder / "moon.png", k=3)  # 512×512 grayscale: 1 channel
    h, w = res.query_size
    assert res.values == 1 * h * w
    data = res.to_dict()
    assert data["set_radius_rms255"] == pytest.approx(res.set_radius / np.sqrt(h * w) * 255, rel=1e-12)
    assert [hit["radius_rms255"] for hit in data["hits"]] == pytest.approx(
        [hit.radius / np.sqrt(h * w) * 255 for hit in res.hits], rel=1e-12)
