"""SIGKILL a real `robret index build` / `update` at exact moments; the next update must heal it.

The kill points (index/ingest.py, ROBRET_INDEX_CRASH_AT) are: after a batch is added in memory but
before its checkpoint; with a segment's temporary file half written (nothing fsynced); with the new
file written to its temporary name (then torn in half here, as a crash mid-write leaves it); after the
rename but before the catalog commit; after the commit but before cleanup. The first checkpoint of a
build writes a base, the next ones segments, so the points at passages 2 and 3 fall inside segment
checkpoints. At each, the directory must already verify (the committed state is always consistent),
and after `update` it must equal a clean build, file for file. (Kills inside compaction:
tests/test_index_segments.py.)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from index import INDEXED, Catalog, Gallery, IngestOptions, build_index, update_index, verify_index
from index.ingest import CRASH_ENV
from index.layout import IndexDir
from _index_fixtures import copy_photos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = ["--batch-size", "3", "--checkpoint-seconds", "0", "--workers", "1", "--no-progress"]


def _robret(args, crash_at: str) -> subprocess.Popen:
    env = {**os.environ, CRASH_ENV: crash_at, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "retrieval.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _state(index_dir, encoder) -> dict[str, np.ndarray]:
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    rows = {r.path: r.id for r in catalog.find(INDEXED)}
    catalog.close()
    with Gallery.open(index_dir, encoder=encoder) as g:
        vecs = g.vectors(list(rows.values()))
        assert len(g) == len(rows)
    return dict(zip(rows, vecs))


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert np.allclose(got[path], want[path], atol=1e-5), path


def _healed(index_dir, encoder, want) -> None:
    report = verify_index(index_dir)
    assert report.ok, report.problems  # consistent right after the kill (leftovers at most)
    update_index(index_dir, encoder=encoder, options=IngestOptions(workers=1))
    report = verify_index(index_dir)
    assert report.ok and not report.notes, (report.problems, report.notes)
    _assert_same(_state(index_dir, encoder), want)


@pytest.fixture(scope="module")
def folder_and_clean(tmp_path_factory, sample_folder, tiny_lipsim):
    base = tmp_path_factory.mktemp("crash")
    folder = copy_photos(sample_folder, base / "photos")
    clean = base / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim)
    return base, folder, _state(clean, tiny_lipsim)


def test_build_killed_at_each_point_then_update_equals_a_clean_build(folder_and_clean, tiny_lipsim):
    base, folder, want = folder_and_clean
    points = ["batch:2", "segment:3", "write:3", "rename:2", "commit:2"]
    procs = {}
    for point in points:  # in parallel: each process pays the torch import once
        index_dir = base / f"killed-{point.replace(':', '-')}"
        # appended segments only (merging checkpoints are killed in test_index_segments.py)
        args = ["index", "build", str(folder), "--index-dir", str(index_dir), "--encoder", "lipsim:cpu-tiny", *BATCH,
                "--compact-segments", "never"]
        procs[point] = (index_dir, _robret(args, point))
    for point, (index_dir, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err.decode()[-2000:])
        layout = IndexDir(index_dir)
        index_meta = Catalog.open(layout.catalog_url()).meta()["index"]
        leftovers = layout.leftovers(index_meta)
        if point.startswith(("write", "segment")):
            (tmp,) = leftovers
            assert tmp.name.startswith("segment.") and tmp.name.endswith(".tmp"), tmp.name
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])  # a torn temporary file
        if point.startswith(("write", "segment", "rename")):
            assert leftovers, point  # the kill really happened mid-protocol
        if point.startswith("commit"):  # a segment was committed: the previous files all stay live
            assert not leftovers and [f["kind"] for f in index_meta["segments"]] == ["faiss", "rows"]
        _healed(index_dir, tiny_lipsim, want)


def test_update_killed_between_rename_and_commit_heals(folder_and_clean, tiny_lipsim, tmp_path):
    base, folder, _ = folder_and_clean
    work = tmp_path / "photos"
    shutil.copytree(folder, work)
    index_dir = tmp_path / "index"
    build_index(work, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim)
    ids_before = {p: i for p, i in ((r.path, r.id) for r in Catalog.open(IndexDir(index_dir).catalog_url()).find())}
    with Image.open(work / "coins.png") as im:
        im.rotate(90).save(work / "coins.png")
    os.rename(work / "brick.png", work / "brick2.png")
    os.remove(work / "rocket.png")
    shutil.copy2(work / "moon.png", work / "moon2.png")
    proc = _robret(["index", "update", str(index_dir), *BATCH], "rename:1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    clean = tmp_path / "clean"
    build_index(work, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim)
    _healed(index_dir, tiny_lipsim, _state(clean, tiny_lipsim))
    rows = {r.path: r.id for r in Catalog.open(IndexDir(index_dir).catalog_url()).find()}
    assert rows["coins.png"] == ids_before["coins.png"] and rows["brick2.png"] == ids_before["brick.png"]
