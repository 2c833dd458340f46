"""Append-only storage: a checkpoint writes a segment of what changed; compaction merges; tombstones hide.

A build's first checkpoint writes a base (a whole FAISS index: nothing was live before it); every later
checkpoint writes only a segment with the rows added since the previous one and the ids removed
(tombstones). Opening applies the live set in order, each file checked against its recorded SHA-256.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import faiss
import numpy as np
import pytest
from PIL import Image

from index import (INDEXED, Catalog, Gallery, IngestOptions, IntegrityError, StoreError, VectorStore, build_index,
                   repair_index, update_index, verify_index)
from index.ingest import COMPACT_SEGMENTS, CRASH_ENV, compact_index
from index.ivf import CertifiedIVF
from index.layout import IndexDir
from index.segments import load_live_store, read_segment, segment_bytes, write_segment
from retrieval.cli import main as robret
from _index_fixtures import PHOTOS, copy_photos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Segments as appended, one per checkpoint (no size-tiered merging): the tests below read them one by one.
EVERY_BATCH = IngestOptions(workers=1, batch_size=3, checkpoint_seconds=0, merge_tiers=False)
OPTS = IngestOptions(workers=1, batch_size=4, merge_tiers=False)


def _meta(index_dir) -> dict:
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    try:
        return catalog.meta()["index"]
    finally:
        catalog.close()


def _kinds(index_dir) -> list[str]:
    return [f["kind"] for f in _meta(index_dir)["segments"]]


def _state(index_dir, encoder) -> dict[str, np.ndarray]:
    """path → stored vector, for every indexed row (and the gallery holds exactly those)."""
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    rows = {r.path: r.id for r in catalog.find(INDEXED)}
    catalog.close()
    with Gallery.open(index_dir, encoder=encoder) as g:
        assert len(g) == len(rows) and set(g.ids().tolist()) == set(rows.values())
        return dict(zip(rows, g.vectors(list(rows.values()))))


def _search_by_path(index_dir, encoder) -> dict[str, list[tuple[float, str]]]:
    """query path → the whole ranking as (−score, path), equal scores (identical files) ordered by path:
    comparable across indexes whose ids differ (with `_same_rankings`)."""
    with Gallery.open(index_dir, encoder=encoder) as g:
        ids, vecs = g.all_vectors()
        scores, found = g.search(vecs, len(g))
        names = [p.name for p in g.paths(ids)]
        return {q: sorted((-float(s), p.name) for p, s in zip(g.paths(f), row))
                for q, f, row in zip(names, found, scores)}


def _same_rankings(got: dict, want: dict) -> None:
    """The same ranking for every query: paths in the same order, scores equal up to float32 rounding
    (a file embedded in another batch may differ in its last bits)."""
    assert got.keys() == want.keys()
    for q in want:
        assert [p for _, p in got[q]] == [p for _, p in want[q]], q
        assert np.allclose([s for s, _ in got[q]], [s for s, _ in want[q]], atol=1e-5), q


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert np.allclose(got[path], want[path], atol=1e-6), path


@pytest.fixture()
def folder(tmp_path, sample_folder):
    return copy_photos(sample_folder, tmp_path / "photos")


# 1. a checkpoint writes only the new rows ---------------------------------------------------------------------
def test_each_checkpoint_writes_a_segment_of_exactly_the_rows_added_since_the_previous_one(folder, tmp_path,
                                                                                           tiny_lipsim):
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=EVERY_BATCH)
    meta = _meta(index_dir)
    dim = int(meta["dim"])
    files = meta["segments"]
    assert [f["kind"] for f in files] == ["faiss"] + ["rows"] * (len(PHOTOS) // 3 - 1)
    assert files[0]["rows"] == 3 and files[0]["version"] == 1  # the first checkpoint's base, never rewritten
    for f in files[1:]:
        path = index_dir / f["name"]
        assert f["rows"] == 3 and f["removed"] == 0
        assert path.stat().st_size == f["bytes"] == segment_bytes(dim, 0, 3) == 28 + 3 * 8 + 3 * 4 * dim
        seg = read_segment(path, dim, f["sha256"])
        assert seg.vectors.shape == (3, dim) and len(seg.removed) == 0
    assert verify_index(index_dir).ok
    # An update that adds two files appends one segment of two rows; no earlier file is touched.
    before = {f["name"]: ((index_dir / f["name"]).stat().st_ino, (index_dir / f["name"]).read_bytes()) for f in files}
    shutil.copy2(folder / "moon.png", folder / "moon-copy.png")  # a copy: its vector is reused, a new row
    with Image.open(folder / "coins.png") as im:
        im.rotate(180).save(folder / "coins-rotated.png")
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    after = _meta(index_dir)["segments"]
    assert after[:-1] == files
    new = after[-1]
    assert new["kind"] == "rows" and new["rows"] == 2 and new["removed"] == 0
    assert (index_dir / new["name"]).stat().st_size == segment_bytes(dim, 0, 2)
    for name, (ino, data) in before.items():
        assert (index_dir / name).stat().st_ino == ino and (index_dir / name).read_bytes() == data
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(_state(index_dir, tiny_lipsim), _state(clean, tiny_lipsim))


# 2. tombstones ------------------------------------------------------------------------------------------------
def test_tombstones_hide_removed_items_and_a_changed_file_keeps_its_id_with_the_new_vector(folder, tmp_path,
                                                                                           tiny_lipsim):
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        ids = {r.path: r.id for r in g.catalog.find(INDEXED)}
        rocket = g.vectors([ids["rocket.png"]])
        old_coins = g.vectors([ids["coins.png"]])
    os.remove(folder / "rocket.png")
    with Image.open(folder / "coins.png") as im:
        im.rotate(90).save(folder / "coins.png")
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    last = _meta(index_dir)["segments"][-1]
    assert last["kind"] == "rows" and last["removed"] == 2 and last["rows"] == 1
    seg = read_segment(index_dir / last["name"], rocket.shape[1], last["sha256"])
    assert sorted(seg.removed.tolist()) == sorted([ids["rocket.png"], ids["coins.png"]])
    assert seg.ids.tolist() == [ids["coins.png"]]
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        assert len(g) == len(PHOTOS) - 1
        _, found = g.search(rocket, k=len(PHOTOS))
        assert ids["rocket.png"] not in found[0].tolist()
        with pytest.raises(StoreError):
            g.vectors([ids["rocket.png"]])
        new_coins = g.vectors([ids["coins.png"]])
        assert (g.ids() == ids["coins.png"]).sum() == 1  # stored once: the tombstone removed the old vector
    assert not np.allclose(new_coins, old_coins)
    assert verify_index(index_dir).ok and verify_index(index_dir, deep=True).ok
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(_state(index_dir, tiny_lipsim), _state(clean, tiny_lipsim))


# 3. compaction ------------------------------------------------------------------------------------------------
def _grown_with_segments(folder, index_dir, encoder) -> None:
    """An index with a base and several segments: built batch by batch, then a removal, a change, a copy."""
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=encoder, options=EVERY_BATCH)
    os.remove(folder / "grass.png")
    with Image.open(folder / "camera.png") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "camera.png")
    shutil.copy2(folder / "moon.png", folder / "moon2.png")
    update_index(index_dir, encoder=encoder, options=OPTS)


def test_compaction_merges_the_segments_into_one_base_equal_to_a_clean_build(folder, tmp_path, tiny_lipsim, capsys):
    index_dir = tmp_path / "index"
    _grown_with_segments(folder, index_dir, tiny_lipsim)
    files = _meta(index_dir)["segments"]
    assert len(files) > 2
    before_state, before_search = _state(index_dir, tiny_lipsim), _search_by_path(index_dir, tiny_lipsim)
    ids_before = sorted(Catalog.open(IndexDir(index_dir).catalog_url()).indexed_id_list())
    assert robret(["index", "compact", "--index-dir", str(index_dir)]) == 0
    assert f"compacted {len(files)} files" in capsys.readouterr().out
    meta = _meta(index_dir)
    assert _kinds(index_dir) == ["faiss"] and meta["file"] == meta["segments"][0]["name"]
    assert sorted(p.name for p in index_dir.iterdir() if p.name.startswith(("vectors.", "segment."))) == [meta["file"]]
    report = verify_index(index_dir, deep=True)
    assert report.ok and not report.notes, (report.problems, report.notes)
    assert sorted(Catalog.open(IndexDir(index_dir).catalog_url()).indexed_id_list()) == ids_before
    after_state = _state(index_dir, tiny_lipsim)
    for path in before_state:  # bit for bit: segments carry the stored vectors exactly
        assert np.array_equal(after_state[path], before_state[path]), path
    assert _search_by_path(index_dir, tiny_lipsim) == before_search
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(after_state, _state(clean, tiny_lipsim))
    _same_rankings(_search_by_path(index_dir, tiny_lipsim), _search_by_path(clean, tiny_lipsim))
    again = compact_index(index_dir)  # nothing left to merge
    assert again["version"] == again["version_before"] == meta["version"]


def test_repair_leaves_one_base_and_writers_compact_past_the_threshold(folder, tmp_path, tiny_lipsim):
    index_dir = tmp_path / "index"
    _grown_with_segments(folder, index_dir, tiny_lipsim)
    want = _state(index_dir, tiny_lipsim)
    repair_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert _kinds(index_dir) == ["faiss"] and verify_index(index_dir).ok
    _assert_same(_state(index_dir, tiny_lipsim), want)
    # compact_segments=2: the live set never holds more than a base and two segments
    other = tmp_path / "threshold"
    build_index(folder, other, "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=1, batch_size=1, checkpoint_seconds=0, compact_segments=2))
    assert len(_kinds(other)) <= 3 and verify_index(other).ok
    _assert_same(_state(other, tiny_lipsim), want)
    # compact_segments=0: every checkpoint writes the whole index (the layout before segments)
    whole = tmp_path / "whole"
    build_index(folder, whole, "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=1, batch_size=3, checkpoint_seconds=0, compact_segments=0))
    assert _kinds(whole) == ["faiss"] and _meta(whole)["version"] == len(list(folder.iterdir())) // 3


def test_size_tiered_merging_keeps_few_files_and_the_exact_state_through_changes(folder, tmp_path, tiny_lipsim):
    # One image per checkpoint: without merging, 12 checkpoints leave a base and 11 segments; the binary
    # counter leaves O(log n) files, and the merged segments (tombstones included) replay exactly.
    index_dir = tmp_path / "index"
    tiered = IngestOptions(workers=1, batch_size=1, checkpoint_seconds=0)
    assert tiered.merge_tiers and tiered.compact_segments == COMPACT_SEGMENTS
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=tiered)
    files = _meta(index_dir)["segments"]
    assert _meta(index_dir)["version"] == len(PHOTOS) and 1 < len(files) <= 4, files  # log2(12) + 1
    assert all(f["kind"] == "rows" for f in files[1:]) and sum(f["rows"] for f in files) == len(PHOTOS)
    appended = tmp_path / "appended"
    build_index(folder, appended, "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=1, batch_size=1, checkpoint_seconds=0, merge_tiers=False))
    assert len(_meta(appended)["segments"]) == len(PHOTOS)
    for f in files:  # the merged files hold exactly what the appended ones did, bit for bit
        assert (index_dir / f["name"]).is_file()
    assert not [p for p in index_dir.iterdir() if p.name.startswith("segment.")
                and p.name not in {f["name"] for f in files}]
    state = _state(index_dir, tiny_lipsim)
    for path, vec in _state(appended, tiny_lipsim).items():
        assert np.array_equal(state[path], vec), path
    # Changes across merged segments: an image changed twice (removed and re-added twice), one removed,
    # one copied; every change is a checkpoint that may merge into the newest files.
    merged_with_tombstones = False
    for step in range(3):
        with Image.open(folder / "camera.png") as im:
            im.rotate(90 * (step + 1)).save(folder / "camera.png")
        if step == 1:
            os.remove(folder / "grass.png")
        if step == 2:
            shutil.copy2(folder / "moon.png", folder / "moon2.png")
        update_index(index_dir, encoder=tiny_lipsim, options=tiered)
        assert verify_index(index_dir, deep=True).ok
        files = _meta(index_dir)["segments"]
        assert len(files) <= 5, files
        # a segment that took in an earlier one and a replacement: rows of both, the old vector's tombstone
        merged_with_tombstones = merged_with_tombstones or any(
            f["kind"] == "rows" and f["rows"] >= 2 and f["removed"] >= 1 for f in files)
    assert merged_with_tombstones
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(_state(index_dir, tiny_lipsim), _state(clean, tiny_lipsim))
    _same_rankings(_search_by_path(index_dir, tiny_lipsim), _search_by_path(clean, tiny_lipsim))


def test_a_writer_merges_the_segments_it_wrote_without_reading_them_back(folder, tmp_path, tiny_lipsim,
                                                                         monkeypatch):
    import index.ingest as ingest

    reads = []
    real = ingest.read_segment
    monkeypatch.setattr(ingest, "read_segment", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=1, batch_size=1, checkpoint_seconds=0))
    # merges happened (v3, v7: into a base; v5, v11: segments of segments), none read a file back
    assert reads == [] and [f["rows"] for f in _meta(index_dir)["segments"]] == [7, 4, 1]
    assert verify_index(index_dir, deep=True).ok
    # a new writer merging an earlier run's segment reads it (checked against its SHA-256)
    with Image.open(folder / "camera.png") as im:
        im.rotate(90).save(folder / "camera.png")
    update_index(index_dir, encoder=tiny_lipsim, options=IngestOptions(workers=1, batch_size=1, checkpoint_seconds=0))
    assert len(reads) == 1 and verify_index(index_dir, deep=True).ok


@pytest.mark.parametrize("point", ["segment:3", "write:5", "rename:5", "commit:5"])
def test_a_merging_checkpoint_killed_at_each_step_leaves_a_consistent_index(folder, tmp_path, tiny_lipsim, point):
    # One image per checkpoint, live sets: v1 [base 1], v2 [base 1, seg 1], v3 [base 3] (merged into a base),
    # v4 [base 3, seg 1], v5 [base 3, seg 2] (the segment of v4 merged with v5's row): killed inside v5,
    # the 3rd segment written, the 5th file written/renamed, the 5th commit.
    index_dir = tmp_path / "index"
    _robret_killed(["index", "build", str(folder), "--index-dir", str(index_dir), "--encoder", "lipsim:cpu-tiny",
                    "--batch-size", "1", "--workers", "1", "--checkpoint-seconds", "0"], point)
    meta = _meta(index_dir)
    assert meta["version"] == (5 if point.startswith("commit") else 4)
    assert [(f["kind"], f["rows"]) for f in meta["segments"]] == (
        [("faiss", 3), ("rows", 2)] if point.startswith("commit") else [("faiss", 3), ("rows", 1)])
    assert verify_index(index_dir).ok
    update_index(index_dir, encoder=tiny_lipsim, options=IngestOptions(workers=1, batch_size=1, checkpoint_seconds=0))
    report = verify_index(index_dir, deep=True)
    assert report.ok and not report.notes, (report.problems, report.notes)
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(_state(index_dir, tiny_lipsim), _state(clean, tiny_lipsim))


# 4. integrity -------------------------------------------------------------------------------------------------
def test_a_tampered_segment_is_refused_with_a_message_naming_repair_until_repair(folder, tmp_path, tiny_lipsim,
                                                                                  capsys):
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=EVERY_BATCH)
    victim = index_dir / _meta(index_dir)["segments"][2]["name"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01  # inside the last stored vector: still a well-formed segment
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="robret index repair") as err:
        Gallery.open(index_dir, encoder=tiny_lipsim)
    assert victim.name in str(err.value)
    report = verify_index(index_dir)
    assert not report.ok and [p for p in report.problems if p.startswith("checksum")] == [
        p for p in report.problems if victim.name in p]
    assert robret(["index", "verify", "--index-dir", str(index_dir)]) == 1
    assert "robret index repair" in capsys.readouterr().out
    with pytest.raises(IntegrityError, match="robret index repair"):
        update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    with pytest.raises(IntegrityError, match="robret index repair"):
        compact_index(index_dir)
    victim.unlink()  # a lost segment: named, and repair as well
    with pytest.raises(StoreError, match="missing; run `robret index repair`"):
        Gallery.open(index_dir)
    assert any(p.startswith("file") and victim.name in p for p in verify_index(index_dir).problems)
    repair_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert verify_index(index_dir).ok and _kinds(index_dir) == ["faiss"]
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(_state(index_dir, tiny_lipsim), _state(clean, tiny_lipsim))


# 5. crash safety of compaction --------------------------------------------------------------------------------
def _robret_killed(args, crash_at: str) -> None:
    env = {**os.environ, CRASH_ENV: crash_at, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "retrieval.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, (crash_at, done.returncode, done.stderr.decode()[-2000:])


@pytest.mark.parametrize("point", ["compact-write:1", "compact-rename:1", "compact-commit:1"])
def test_compaction_killed_at_each_step_leaves_a_consistent_index_that_update_cleans(folder, tmp_path, tiny_lipsim,
                                                                                     point):
    index_dir = tmp_path / "index"
    _grown_with_segments(folder, index_dir, tiny_lipsim)
    want, files = _state(index_dir, tiny_lipsim), _meta(index_dir)["segments"]
    _robret_killed(["index", "compact", "--index-dir", str(index_dir)], point)
    meta = _meta(index_dir)
    leftovers = IndexDir(index_dir).leftovers(meta)
    if point.startswith("compact-commit"):  # committed: the new base alone is live, the old files are leftovers
        assert _kinds(index_dir) == ["faiss"] and sorted(p.name for p in leftovers) == sorted(f["name"] for f in files)
    else:  # not committed: the old live set, intact; the new base (or its temporary file) is a leftover
        assert meta["segments"] == files and len(leftovers) == 1
    report = verify_index(index_dir)
    assert report.ok and len(report.notes) == len(leftovers), (report.problems, report.notes)
    _assert_same(_state(index_dir, tiny_lipsim), want)
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)  # the next writer deletes the leftovers
    report = verify_index(index_dir)
    assert report.ok and not report.notes, (report.problems, report.notes)
    compact_index(index_dir)
    assert _kinds(index_dir) == ["faiss"] and verify_index(index_dir, deep=True).ok
    _assert_same(_state(index_dir, tiny_lipsim), want)


def test_orphan_files_of_a_killed_checkpoint_are_deleted_when_the_next_writer_opens(folder, tmp_path, tiny_lipsim):
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=EVERY_BATCH)
    version = _meta(index_dir)["version"]
    layout = IndexDir(index_dir)
    orphan = layout.segment_file(version + 1)
    write_segment(orphan, 33, [], [999], np.eye(1, 33, dtype=np.float32))  # durable, never committed
    (index_dir / f"segment.{version + 2:08d}.rows.abc123.tmp").write_bytes(b"torn")
    report = verify_index(index_dir)
    assert report.ok and len(report.notes) == 2
    with Gallery.open(index_dir) as g:
        assert 999 not in g.ids().tolist() and len(g) == len(PHOTOS)
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert not layout.leftovers(_meta(index_dir)) and not orphan.exists()
    assert verify_index(index_dir).ok


# 6. indexes written before segments ---------------------------------------------------------------------------
def test_an_index_written_before_segments_opens_as_one_base_and_grows_segments(folder, tmp_path, tiny_lipsim):
    """The layout before segments: one `vectors.<version>.faiss` named by the catalog's `file`/`sha256`/`rows`,
    no `segments`, schema version 1 (this test writes that catalog state over a fresh single-file build)."""
    index_dir = tmp_path / "index"
    os.remove(folder / "text.png")
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    old = {k: v for k, v in catalog.meta()["index"].items() if k != "segments"}
    catalog.set_meta({"index": old, "schema_version": 1})
    catalog.close()
    assert old["file"] == f"vectors.{old['version']:08d}.faiss"
    want = _state(index_dir, tiny_lipsim)
    assert verify_index(index_dir).ok
    # a flipped byte in the old single file is still refused with the message naming repair
    path = index_dir / old["file"]
    pristine = path.read_bytes()
    path.write_bytes(pristine[:-5] + bytes([pristine[-5] ^ 1]) + pristine[-4:])
    with pytest.raises(IntegrityError, match="robret index repair"):
        Gallery.open(index_dir)
    path.write_bytes(pristine)
    # an update appends a segment after the old file, which stays live and untouched
    shutil.copy2(folder / "moon.png", folder / "moon3.png")
    with Image.open(folder / "brick.png") as im:
        im.rotate(90).save(folder / "text.png")
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    meta = _meta(index_dir)
    assert [f["name"] for f in meta["segments"]][0] == old["file"] and _kinds(index_dir) == ["faiss", "rows"]
    assert path.read_bytes() == pristine and verify_index(index_dir, deep=True).ok
    state = _state(index_dir, tiny_lipsim)
    assert want.keys() < state.keys()
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    _assert_same(state, _state(clean, tiny_lipsim))


# 7. IVF: a base with segments, and the certified bounds ------------------------------------------------------
def test_segments_on_an_ivf_base_load_into_the_ivf_and_every_certified_bound_holds(tmp_path):
    rng = np.random.default_rng(0)
    dim, n = 16, 400

    def unit(k):
        x = rng.standard_normal((k, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base = VectorStore.from_vectors(np.arange(n), unit(n), "IVF8,Flat", use_gpu=False)
    layout = IndexDir(tmp_path)
    digest = base.write(layout.index_file(1))
    far = unit(30) * -1  # new rows anywhere on the sphere: the lists' radii must grow to cover them
    seg2, size2 = write_segment(layout.segment_file(2), dim, [3, 5], np.arange(n, n + 30), far)
    seg3, _ = write_segment(layout.segment_file(3), dim, [n + 1], [5], unit(1))  # id 5 comes back, n+1 goes
    files = [{"name": layout.index_file(1).name, "kind": "faiss", "sha256": digest, "rows": n},
             {"name": layout.segment_file(2).name, "kind": "rows", "sha256": seg2, "rows": 30, "removed": 2},
             {"name": layout.segment_file(3).name, "kind": "rows", "sha256": seg3, "rows": 1, "removed": 1}]
    meta = {"version": 3, "dim": dim, "rows": n + 30 - 2 + 1 - 1, "factory": "IVF8,Flat", "params": {},
            "segments": files}
    store = load_live_store(layout, meta, use_gpu=False)
    assert store.factory == "IVF8,Flat" and store.ntotal == meta["rows"]
    want_ids = sorted(set(range(n + 30)) - {3, n + 1})
    assert sorted(store.ids().tolist()) == want_ids
    assert np.array_equal(store.reconstruct(np.arange(n, n + 30)[np.arange(30) != 1]), np.delete(far, 1, axis=0))
    ivf = CertifiedIVF.from_faiss(store.index)
    for c in range(ivf.nlist):
        ids, vecs = ivf.list_vectors(c)
        if len(ids):
            dist = np.linalg.norm(vecs.astype(np.float64) - ivf.centroids[c].astype(np.float64), axis=1)
            assert dist.max() <= ivf.rho[c]
    q = unit(5)
    exact = faiss.IndexFlatIP(dim)
    all_vecs = store.reconstruct(np.asarray(want_ids))
    exact.add(all_vecs)
    for qi in q:
        u = ivf.upper_bounds(qi)
        for c in range(ivf.nlist):
            _, vecs = ivf.list_vectors(c)
            if len(vecs):
                assert (vecs.astype(np.float64) @ qi.astype(np.float64)).max() <= u[c]
    assert np.allclose(store.search(q, 5, exact=True)[0], exact.search(q, 5)[0], atol=1e-6)
    # a tampered segment is refused before any of it is applied
    data = bytearray(layout.segment_file(2).read_bytes())
    data[100] ^= 1
    layout.segment_file(2).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="robret index repair"):
        load_live_store(layout, meta, use_gpu=False)
    assert size2 == segment_bytes(dim, 2, 30)


def test_an_ivf_gallery_grown_by_segments_answers_the_exhaustive_certificate_before_and_after_compaction(
        tmp_path, tiny_lipsim):
    from encoder.certify import certify_topk_bruteforce
    from retrieval.search import search_embedding

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(92):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    late = [folder / f"{i:02d}.png" for i in range(80, 92)]
    for p in late:
        p.rename(p.with_suffix(".later"))
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, index_type="IVF2,Flat",
                options=IngestOptions(workers=2, batch_size=40))
    assert _kinds(index_dir) == ["faiss"] and _meta(index_dir)["factory"] == "IVF2,Flat"
    for p in late:
        p.with_suffix(".later").rename(p)
    for i in range(3):
        os.remove(folder / f"{i:02d}.png")
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    last = _meta(index_dir)["segments"][-1]
    assert _kinds(index_dir) == ["faiss", "rows"] and last["rows"] == 12 and last["removed"] == 3

    def check():
        with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
            assert g.store.factory == "IVF2,Flat" and len(g) == 89
            ivf = g.certified_ivf
            for c in range(ivf.nlist):  # every radius bound covers its list, the segment's rows included
                _, vecs = ivf.list_vectors(c)
                if len(vecs):
                    assert np.linalg.norm(vecs.astype(np.float64) - ivf.centroids[c], axis=1).max() <= ivf.rho[c]
            ids, vecs = g.all_vectors()
            out = []
            for row in (int(np.argmin(ids)), int(np.argmax(ids))):  # by id: the order of ids() may differ
                res = search_embedding(g, vecs[row], k=4, exclude=[int(ids[row])])
                keep = np.arange(len(ids)) != row
                top, radius, _ = certify_topk_bruteforce(vecs[row], vecs[keep], 4, 1.0, slack=res.slack)
                assert res.method == "certified-ivf" and res.exhaustive
                assert [h.id for h in res.hits] == ids[keep][top].tolist()
                np.testing.assert_allclose([h.radius for h in res.hits], radius, rtol=1e-9)
                out.append([(h.id, h.radius) for h in res.hits])
            return out

    before = check()
    assert verify_index(index_dir, deep=True).ok
    compact_index(index_dir)
    assert _kinds(index_dir) == ["faiss"] and verify_index(index_dir, deep=True).ok
    after = check()
    assert [[i for i, _ in r] for r in after] == [[i for i, _ in r] for r in before]
    for a, b in zip(after, before):
        np.testing.assert_allclose([r for _, r in a], [r for _, r in b], rtol=1e-9)


def test_the_command_line_sets_when_writers_compact(folder, tmp_path, tiny_lipsim, capsys):
    """`--compact-segments never` keeps every checkpoint a segment; `0` writes one base each time; the help states
    the library's default."""
    base = ["--encoder", "lipsim:cpu-tiny", "--batch-size", "2", "--checkpoint-seconds", "0", "--workers", "1",
            "--no-progress"]
    never, whole = tmp_path / "never", tmp_path / "whole"
    assert robret(["index", "build", str(folder), "--index-dir", str(never), "--compact-segments", "never", *base]) == 0
    kinds = _kinds(never)
    assert kinds[0] == "faiss" and kinds.count("faiss") == 1 and len(kinds) >= 3  # one base, then segments only
    assert robret(["index", "build", str(folder), "--index-dir", str(whole), "--compact-segments", "0", *base]) == 0
    assert _kinds(whole) == ["faiss"]
    _assert_same(_state(whole, tiny_lipsim), _state(never, tiny_lipsim))
    with pytest.raises(SystemExit):
        robret(["index", "build", "--help"])
    assert f"default {COMPACT_SEGMENTS}," in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        robret(["index", "build", str(folder), "--index-dir", str(tmp_path / "x"), "--compact-segments", "-1"])
    assert "--compact-segments" in capsys.readouterr().err
