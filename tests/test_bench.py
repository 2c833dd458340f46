"""Benchmark data (deterministic, held-out photos only, labelled folders) and the quick benchmark run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.samples import DEMO_TRAIN_PHOTOS, HELDOUT_PHOTOS
from retrieval.bench_data import folder_benchmark, heldout_benchmark, load_benchmark
from retrieval.metrics import recall_at_k

from _adversarial_fixtures import small_benchmark


def test_heldout_benchmark_is_deterministic_and_uses_only_heldout_photos():
    ds = heldout_benchmark(32, crops_per_photo=2, distractors_per_photo=1, seed=0)  # every family
    again = heldout_benchmark(32, crops_per_photo=2, distractors_per_photo=1, seed=0)
    other = heldout_benchmark(32, crops_per_photo=2, distractors_per_photo=1, seed=1)
    assert ds.fingerprint() == again.fingerprint() != other.fingerprint()
    assert set(ds.info["gallery_sources"]) == set(HELDOUT_PHOTOS)
    assert not set(ds.info["gallery_sources"]) & set(DEMO_TRAIN_PHOTOS)
    with pytest.raises(ValueError, match="held-out"):
        heldout_benchmark(32, photos=[DEMO_TRAIN_PHOTOS[0]])


def test_heldout_benchmark_shapes_labels_and_edits():
    ds = small_benchmark()
    n_photos = len(HELDOUT_PHOTOS)
    assert ds.gallery.shape == (3 * n_photos, 3, 32, 32) and ds.queries.shape == (2 * n_photos, 3, 32, 32)
    for t in (ds.gallery, ds.queries):
        assert t.dtype == torch.float32 and float(t.min()) >= 0 and float(t.max()) <= 1 and t.is_contiguous()
    # every query points at one gallery region; distractors are never asked for
    assert ds.gallery_labels.tolist() == list(range(ds.gallery.shape[0]))
    assert len(set(ds.query_labels.tolist())) == ds.queries.shape[0]
    assert ds.info["distractors"] == n_photos and (ds.query_self_index == -1).all()
    assert all(2 <= len(edits) <= 3 for edits in ds.info["query_edits"])
    # queries are edited, not copies, yet still nearest to their own region in raw pixels
    src = ds.gallery[ds.query_labels]
    assert float((ds.queries - src).abs().flatten(1).amax(1).min()) > 0
    sim = -torch.cdist(ds.queries.flatten(1), ds.gallery.flatten(1))
    assert recall_at_k(sim, ds.query_labels, ds.gallery_labels)[1] >= 75.0


def test_folder_benchmark_is_leave_one_out(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("birds", "cars", "chairs"):
        (tmp_path / c).mkdir()
        base = rng.integers(0, 255, size=(3,), dtype=np.uint8)
        for i in range(3):
            arr = np.clip(base + rng.integers(-10, 10, size=(40, 50, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cars" / "notes.txt").write_text("not an image")
    ds = folder_benchmark(tmp_path, size=16)
    assert ds.gallery.shape == (9, 3, 16, 16) and ds.info["classes"] == ["birds", "cars", "chairs"]
    assert ds.query_self_index.tolist() == list(range(9))
    sim = -torch.cdist(ds.queries.flatten(1), ds.gallery.flatten(1))
    # with the query itself excluded, its nearest neighbour is another image of its colour class
    assert recall_at_k(sim, ds.query_labels, ds.gallery_labels, self_index=ds.query_self_index)[1] == 100.0
    assert load_benchmark(str(tmp_path), size=16, quick=True).queries.shape[0] == 9
    with pytest.raises(FileNotFoundError):
        load_benchmark(str(tmp_path / "missing"))


def test_quick_benchmark_writes_json_markdown_and_plots(tmp_path):
    from benchmarks.adversarial_retrieval import run

    report = run(["--quick", "--encoders", "pixels", "lipsim:cpu-tiny", "lipsim:/no/such/file.safetensors",
                  "--out", str(tmp_path), "--no-progress"])
    for name in ("results.json", "results.md", "recall_vs_eps_l2.png", "recall_vs_eps_linf.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dataset"]["fingerprint"] == report["dataset"]["fingerprint"]
    enc = saved["encoders"]
    assert enc["lipsim:/no/such/file.safetensors"]["status"] == "skipped"
    for spec in ("pixels", "lipsim:cpu-tiny"):
        r = enc[spec]
        assert r["status"] == "ok" and r["certificate_violations"] == 0
        assert 0 <= r["empirical"]["l2"]["0.5"]["recall@1"] <= r["clean"]["recall@1"]
        assert r["certified_l2"]["0.5"] <= r["clean"]["recall@1"]
        assert np.isfinite(r["robrank"]["ers"])
        # the top-k attack goes through attack_query: every query certified (both have a bound), none broken
        assert r["topk"]["certificate_violations"] == 0 and r["topk"]["certified_queries"] == r["topk"]["queries"] > 0
    assert "| pixels |" in (tmp_path / "results.md").read_text()
