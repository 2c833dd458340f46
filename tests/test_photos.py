"""The recorded wallpaper photographs (encoder/data/photos.py): the split rule on the recorded list,
the photograph check, the installed-file check; what needs the Debian packages skips without them."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from encoder.data import photos
from encoder.io import file_sha256

RECORDED = photos.recorded_photos()
INSTALLED = shutil.which("dpkg") is not None and not photos.check_installed(RECORDED)
needs_packages = pytest.mark.skipif(not INSTALLED, reason="wallpaper packages not installed (`make photos`)")


def test_recorded_split_is_by_package_with_every_file_once():
    assert len(RECORDED) >= 30
    by_package = {}
    for r in RECORDED:
        by_package.setdefault(r.package, set()).add(r.split)
        assert r.split == ("heldout" if r.package in photos.HELDOUT_PACKAGES else "train")
        assert r.package in photos.PHOTO_PACKAGES and len(r.sha256) == 64 and min(r.width, r.height) >= 1000
    assert all(len(sides) == 1 for sides in by_package.values())  # no package on both sides
    assert len({r.sha256 for r in RECORDED}) == len(RECORDED)  # no file twice, so none on both sides
    assert len({r.path for r in RECORDED}) == len(RECORDED)
    held, train = photos.recorded_photos("heldout"), photos.recorded_photos("train")
    assert len(held) >= 10 and len(train) >= 20 and len(held) + len(train) == len(RECORDED)
    assert not {r.path for r in RECORDED} & set(photos.REVIEWED_NOT_PHOTO)
    with pytest.raises(ValueError, match="split"):
        photos.recorded_photos("test")


def test_laplacian_energy_matches_a_hand_computed_impulse():
    arr = np.zeros((10, 10), dtype=np.uint8)
    arr[5, 5] = 255
    # interior 8×8: |4·255| at the impulse and |−255| at its four neighbours → 2040 / 64
    assert photos.laplacian_energy(Image.fromarray(arr)) == pytest.approx(2040 / 64)


def test_photo_check_rejects_png_gradients_and_reviewed_art_and_keeps_textured_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    texture = np.clip(128 + rng.normal(0, 40, size=(300, 400, 3)), 0, 255).astype(np.uint8)
    # a sky-like ramp (60 → 120 over 400 px); a full 0 → 255 ramp's 8-bit staircase alone measures 1.4
    gradient = np.broadcast_to(np.linspace(60, 120, 400, dtype=np.float64)[None, :, None], (300, 400, 3))
    Image.fromarray(texture).save(tmp_path / "texture.jpg", quality=90)
    Image.fromarray(texture).save(tmp_path / "texture.png")
    Image.fromarray(gradient.astype(np.uint8)).save(tmp_path / "gradient.jpg", quality=95)
    assert photos.photo_check(tmp_path / "texture.jpg") is None
    assert "format PNG" in photos.photo_check(tmp_path / "texture.png")
    assert "smooth gradient" in photos.photo_check(tmp_path / "gradient.jpg")
    reviewed = next(iter(photos.REVIEWED_NOT_PHOTO))
    assert photos.photo_check(reviewed).startswith("reviewed:")  # decided before the file is read


def test_check_installed_names_missing_and_changed_files(tmp_path, monkeypatch):
    good = tmp_path / "a.jpg"
    good.write_bytes(b"one")
    changed = tmp_path / "b.jpg"
    changed.write_bytes(b"two")
    recs = [photos.PhotoRecord("p", str(good), file_sha256(good), 1, 1, "heldout"),
            photos.PhotoRecord("p", str(changed), file_sha256(good), 1, 1, "heldout"),
            photos.PhotoRecord("p", str(tmp_path / "gone.jpg"), "0" * 64, 1, 1, "heldout")]
    problems = photos.check_installed(recs)
    assert len(problems) == 2 and "SHA-256 differs" in problems[0] and "missing" in problems[1]
    csv_path = photos.write_records(recs, tmp_path / "photos.csv")
    assert photos.recorded_photos(path=csv_path) == recs  # round trip
    monkeypatch.setattr(photos, "RECORDED_CSV", csv_path)
    from retrieval.bench_data import load_benchmark

    with pytest.raises(FileNotFoundError, match="make photos"):
        load_benchmark("photos", size=16, quick=True)


@needs_packages
def test_installed_packages_reproduce_the_recorded_list():
    kept, rejected = photos.record_photos()
    assert kept == RECORDED
    assert {p for p, _ in rejected} >= set(photos.REVIEWED_NOT_PHOTO) - {
        "/usr/share/backgrounds/2004default.jpg"}  # every reviewed file is a candidate of a recorded package
