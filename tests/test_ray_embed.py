"""Distributed embedding on a local Ray cluster (ray.init(num_cpus=2)): same index as a local build,
an actor killed mid-run, the driver killed mid-run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from index import Gallery, IngestOptions, build_index, update_index, verify_index  # noqa: E402
from index.catalog import Catalog  # noqa: E402
from index.ingest import CRASH_ENV  # noqa: E402
from index.layout import IndexDir  # noqa: E402
from index.ray_embed import RAY_CRASH_ENV, RayEmbedder  # noqa: E402

from _index_fixtures import copy_photos, make_hostile_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = "lipsim:cpu-tiny"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sample_folder):
    root = tmp_path_factory.mktemp("ray") / "photos"
    copy_photos(sample_folder, root, ("astronaut", "brick", "camera", "coins", "moon"))
    make_hostile_folder(root / "hostile")
    return root


def rows(index_dir) -> dict:
    """{path: (id, status, reason, content_hash, width, height)} over every catalog row."""
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    try:
        return {r.path: (r.id, r.status, r.reason, r.content_hash, r.width, r.height) for r in catalog.find()}
    finally:
        catalog.close()


def vectors(index_dir) -> dict:
    with Gallery.open(index_dir, use_gpu=False) as g:
        ids, vecs = g.all_vectors()
        assert len(set(ids.tolist())) == len(ids), "duplicate ids in the index"
        return dict(zip(ids.tolist(), vecs))


@pytest.fixture(scope="module")
def local_index(folder, tmp_path_factory, tiny_lipsim):
    out = tmp_path_factory.mktemp("local") / "index"
    build_index(folder, out, SPEC, encoder=tiny_lipsim, options=IngestOptions(workers=1, batch_size=4, use_gpu=False))
    return out


def assert_same_index(a, b) -> None:
    ra, rb = rows(a), rows(b)
    assert ra == rb
    va, vb = vectors(a), vectors(b)
    assert va.keys() == vb.keys() == {i for i, status, *_ in ra.values() if status == "indexed"}
    for i in va:
        np.testing.assert_allclose(va[i], vb[i], atol=1e-5)
    assert verify_index(b).ok


def test_ray_build_equals_local_build_on_a_folder_with_bad_files(cluster, folder, local_index, tmp_path, tiny_lipsim):
    out = tmp_path / "index"
    report = build_index(folder, out, SPEC, encoder=tiny_lipsim,
                         options=IngestOptions(workers=1, batch_size=4, use_gpu=False,
                                               embed_files=RayEmbedder(actors=2, batch_size=4)))
    assert report.failed and report.indexed > 5
    assert_same_index(local_index, out)


def test_killed_actor_is_retried_without_duplicate_rows(cluster, folder, local_index, tmp_path, tiny_lipsim,
                                                         monkeypatch):
    marker = tmp_path / "actor-killed"
    monkeypatch.setenv(RAY_CRASH_ENV, str(marker))
    out = tmp_path / "index"
    build_index(folder, out, SPEC, encoder=tiny_lipsim,
                options=IngestOptions(workers=1, batch_size=4, use_gpu=False,
                                      embed_files=RayEmbedder(actors=1, batch_size=4)))
    assert marker.exists(), "no actor was killed"
    assert_same_index(local_index, out)


def test_driver_killed_mid_run_then_update_completes(cluster, folder, local_index, tmp_path, tiny_lipsim):
    out = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT), CRASH_ENV: "batch:2"}
    done = subprocess.run([sys.executable, "-m", "retrieval.cli", "index", "build", str(folder), "--index-dir",
                           str(out), "--encoder", SPEC, "--cpu", "--batch-size", "4", "--workers", "1",
                           "--checkpoint-seconds", "0", "--ray", "auto", "--ray-actors", "1"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == -9, done.stderr[-2000:]  # SIGKILLed at the second batch
    partial = {p: r for p, r in rows(out).items() if r[1] == "indexed"}
    assert 0 < len(partial) < len(vectors(local_index))
    update_index(out, encoder=tiny_lipsim, options=IngestOptions(workers=1, batch_size=4, use_gpu=False))
    # Ids are given in processing order, so after a crash they may differ: compare by path.
    ra, rb = rows(local_index), rows(out)
    assert {p: r[1:] for p, r in ra.items()} == {p: r[1:] for p, r in rb.items()}
    va, vb = vectors(local_index), vectors(out)
    assert len(vb) == len(va)
    for path, (i, status, *_) in ra.items():
        if status == "indexed":
            np.testing.assert_allclose(va[i], vb[rb[path][0]], atol=1e-5)
    assert verify_index(out).ok


def test_ray_actors_without_ray_is_refused(tmp_path, capsys):
    from retrieval.cli import main

    assert main(["index", "update", str(tmp_path), "--ray-actors", "2"]) == 1
    assert "--ray-actors needs --ray" in capsys.readouterr().err


def test_ray_build_from_a_list_equals_the_local_list_build_with_a_progress_bar(cluster, folder, tmp_path,
                                                                               tiny_lipsim, sample_folder, capsys):
    from index.scan import scan_folder

    outside = copy_photos(sample_folder, tmp_path / "elsewhere", ("coffee",)) / "coffee.png"
    listing = tmp_path / "files.txt"
    entries = [e.path for e in scan_folder(folder).entries]  # with the hostile files (one name not UTF-8)
    listing.write_bytes(b"\n".join([*entries, os.fsencode(outside), os.fsencode(folder / "missing.png")]) + b"\n")
    local, remote = tmp_path / "local", tmp_path / "ray"
    build_index(f"@{listing}", local, SPEC, encoder=tiny_lipsim, root=folder,
                options=IngestOptions(workers=1, batch_size=4, use_gpu=False))
    capsys.readouterr()
    report = build_index(f"@{listing}", remote, SPEC, encoder=tiny_lipsim, root=folder,
                         options=IngestOptions(workers=1, batch_size=4, use_gpu=False, progress=True,
                                               embed_files=RayEmbedder(actors=1, batch_size=4)))
    kinds = {path: reason.split(":", 1)[0] for path, reason in report.failed}
    assert kinds[str(outside)] == "outside_root" and kinds["missing.png"] == "missing"
    assert_same_index(local, remote)
    err = capsys.readouterr().err
    import re

    done = re.findall(r"indexing: 100%\|[^|]*\| (\d+)/(\d+) \[", err)  # the bar ran to its end, in images
    assert done and done[-1][0] == done[-1][1] and int(done[-1][0]) >= report.indexed and "img/s" in err


def test_ray_actor_reads_are_confined_to_the_root_on_the_opened_descriptor(folder, tmp_path, sample_folder):
    """A file swapped for a symlink out of the root after the listing is refused by the actor itself."""
    from dataclasses import asdict

    from index.decode import DecodeLimits
    from index.embedder import identity, load
    from index.ray_embed import _EmbedActor

    outside = copy_photos(sample_folder, tmp_path / "elsewhere", ("coffee",)) / "coffee.png"
    root = copy_photos(sample_folder, tmp_path / "root", ("brick",))
    (root / "swapped.png").symlink_to(outside)
    actor = _EmbedActor(identity(load(SPEC, "cpu"), SPEC), asdict(DecodeLimits()), root=os.fsencode(root))
    out = actor({"i": [0, 1], "path": [os.fsencode(root / "brick.png"), os.fsencode(root / "swapped.png")]})
    assert out["error"][0] == "" and str(out["error"][1]).startswith("symlink_escape")
