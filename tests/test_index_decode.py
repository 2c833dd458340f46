"""Hostile input: every kind gets its own reason (or note), and none aborts a build."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

from index import FAILED, INDEXED, Catalog, DecodeError, FolderError, Gallery, IngestOptions, build_index, verify_index
from index.decode import DecodeLimits, read_image
from index.layout import IndexDir
from _index_fixtures import make_hostile_folder


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_lipsim):
    root = tmp_path_factory.mktemp("hostile") / "photos"
    expect = make_hostile_folder(root)
    index_dir = root.parent / "index"
    report = build_index(root, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim,
                         options=IngestOptions(workers=2, batch_size=4))
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    rows = {r.path: r for r in catalog.find()}
    catalog.close()
    return root, index_dir, expect, report, rows


def test_build_over_hostile_folder_completes_and_verifies(hostile):
    _, index_dir, expect, report, rows = hostile
    assert verify_index(index_dir).ok
    n_ok = sum(1 for status, _ in expect.values() if status == "indexed")
    assert report.total == n_ok
    assert len(report.failed) == len(expect) - n_ok
    assert report.ignored >= 1  # notes.txt


@pytest.mark.parametrize("name", [
    "good.png", "truncated.jpg", "corrupt.png", "empty.jpg", "readme.png", "noise.jpg", "hi.png", "soi.jpg", "bomb.png",
    "bomb-small.png",
    "cmyk.jpg", "gray16.png", "rgb16.png", "palette.png", "alpha.png", "gray.png", "rotated.jpg", "animated.gif",
    "tiny.png", "strip.png", "link-inside.png", "link-escape.png", "link-broken.png", "link-self.png",
    "sub/nested.png", "pipe.png", "caf\\xe9.png",
])
def test_each_hostile_kind_gets_its_reason(hostile, name):
    _, _, expect, _, rows = hostile
    status, text = expect[name]
    row = rows[name]
    assert row.status == status, (name, row.status, row.reason)
    if status == FAILED:
        assert row.reason and row.reason.startswith(text), (name, row.reason)
    elif text is not None:
        assert row.notes and text in row.notes, (name, row.notes)


def test_symlink_loops_and_escaping_directories_are_not_walked(hostile):
    _, _, _, report, rows = hostile
    assert not any(p.startswith(("sub/loop/", "sub/out/")) for p in rows)
    text = " ".join(report.warnings)
    assert "sub/loop" in text and "not followed" in text
    assert "sub/out" in text and "leaves the indexed folder" in text


def test_exif_orientation_is_applied_to_size_and_pixels(hostile, tiny_lipsim):
    root, index_dir, _, _, rows = hostile
    row = rows["rotated.jpg"]
    assert (row.width, row.height) == (30, 60)  # stored 60×30, displayed rotated
    with Image.open(root / "rotated.jpg") as im:
        # Orientation 6: the stored pixels must be turned 90° clockwise. Rebuilt from the array, so
        # that no EXIF tag travels with the reference image.
        upright = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(im.convert("RGB")), k=-1)))
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        stored = g.vectors([row.id])[0]
        manual = g.embed_images([upright])[0]
    assert np.allclose(stored, manual, atol=1e-5)


def test_non_utf8_file_name_round_trips_to_the_real_path(hostile, tiny_lipsim):
    root, index_dir, _, _, rows = hostile
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        path = g.path(rows["caf\\xe9.png"].id)
    assert os.fsencode(path) == os.path.join(os.fsencode(root), b"caf\xe9.png")
    assert path.is_file()


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    im = Image.fromarray(np.zeros((100, 100, 3), np.uint8))
    im.save(tmp_path / "a.png")
    with pytest.raises(DecodeError) as err:
        read_image(tmp_path / "a.png", DecodeLimits(max_pixels=9_999))
    assert err.value.kind == "too_many_pixels" and "10,000" in err.value.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files: the permission path is covered "
                    "by test_permission_error_becomes_a_reason instead")
def test_unreadable_file_gets_permission_reason(tmp_path):
    path = tmp_path / "locked.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    path.chmod(0)
    with pytest.raises(DecodeError) as err:
        read_image(path)
    assert err.value.kind == "permission"


def test_permission_error_becomes_a_reason(tmp_path, monkeypatch):
    # Tests run as root here, where chmod 000 does not stop reading: inject the error open() would raise.
    real_open = os.open

    def deny(path, *a, **kw):
        if os.fsdecode(path).endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, *a, **kw)

    path = tmp_path / "locked.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(DecodeError) as err:
        read_image(path)
    assert err.value.kind == "permission" and err.value.reason == "permission: permission denied"


def test_missing_folder_is_a_clear_error(tmp_path, tiny_lipsim):
    with pytest.raises(FolderError, match="does not exist"):
        build_index(tmp_path / "nope", tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim)
    assert not (tmp_path / "index").exists()


def test_failed_files_are_not_retried_until_they_change(hostile, tiny_lipsim):
    root, index_dir, _, _, _ = hostile
    from index import update_index

    report = update_index(index_dir, encoder=tiny_lipsim)
    assert report.embedded == 0 and not report.failed and report.still_failed > 0
    # Fix a broken file: it is picked up and indexed under its old id.
    before = {r.path: r.id for r in Catalog.open(IndexDir(index_dir).catalog_url()).find()}
    Image.fromarray((torch.rand(3, 40, 40).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
        root / "truncated.jpg", "JPEG")
    report = update_index(index_dir, encoder=tiny_lipsim)
    assert report.indexed == 1
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    row = {r.path: r for r in catalog.find()}["truncated.jpg"]
    catalog.close()
    assert row.status == INDEXED and row.id == before["truncated.jpg"] and row.reason is None
    assert verify_index(index_dir).ok
