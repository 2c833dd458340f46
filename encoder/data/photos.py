"""Real photographs from Debian desktop-wallpaper packages: the recorded list, its split, and its checks.

The wallpaper packages carry real photographs next to rendered and vector art. `make photos` installs
`PHOTO_PACKAGES` (apt-get, idempotent) and checks every recorded file against its SHA-256; nothing is
downloaded at run time and `make test` never needs these packages (tests that read the files skip).

Which files are photographs
---------------------------
One file per wallpaper (a Plasma wallpaper ships one picture in several resolutions, MATE's Elephants
three: the largest is kept; Plasma's `images_dark` variants and `screenshot.*` previews are the same
picture again and are never candidates). A candidate is kept when

1. its format is JPEG: every PNG / WebP / SVG in these packages is rendered or vector art (checked by
   looking at all of them), while cameras write JPEG;
2. it is not a smooth gradient: the mean absolute 4-neighbour Laplacian of its luma, on a thumbnail
   whose longer side is 256 px, is at least `MIN_LAPLACIAN` (in 1/255 units). A weak filter on purpose:
   it drops flat colour and smooth gradients (0–0.65 in these packages), while the recorded photos
   measure 1.5 (a misty lake at dusk) to 45; rendered art spans the same range, hence rule 3;
3. it is not in `REVIEWED_NOT_PHOTO`: JPEGs that pass 1–2 but are paintings or renders, found by
   looking at a thumbnail of every candidate of every package (the reason is written next to each).

The list (package, path, SHA-256, size, split) is recorded in `photos.csv` next to this module.

The split
---------
By source package: every photo of a package in `HELDOUT_PACKAGES` is held out (evaluation, the
retrieval benchmark), every other one is training data. A held-out photo, and so any crop of it, never
reaches training; the recorded list has no SHA-256 twice, and `record` refuses a photo whose 16×16
thumbnail is near-identical to one on the other side (the same picture re-encoded in two packages).
The scikit-image / matplotlib samples keep their own fixed split (encoder/samples.py).
"""
from __future__ import annotations

import csv
import io
import re
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_write_text, file_sha256

__all__ = ["PHOTO_PACKAGES", "HELDOUT_PACKAGES", "REVIEWED_NOT_PHOTO", "MIN_LAPLACIAN", "RECORDED_CSV", "PhotoRecord",
           "laplacian_energy", "photo_check", "wallpaper_candidates", "record_photos", "write_records",
           "recorded_photos", "check_installed", "installed_photos", "split_of", "load_reduced"]

# Packages whose photographs are recorded (`make photos` installs exactly these). Reviewed and found to
# hold no photograph (all rendered or vector art): gnome-backgrounds 43.1, ukui-wallpapers 20.04.3,
# lomiri-wallpapers 20.04.0, sway-backgrounds 1.7.
PHOTO_PACKAGES: tuple[str, ...] = (
    "mate-backgrounds", "plasma-workspace-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
)
# Held out for evaluation: Plasma's photos (landscapes, architecture, objects; 12 photos from 11+
# photographers). The others (MATE's nature close-ups, Ubuntu's community photos) train.
HELDOUT_PACKAGES: tuple[str, ...] = ("plasma-workspace-wallpapers",)

MIN_LAPLACIAN = 1.0  # mean |4-neighbour Laplacian| of luma, 1/255 units, on a ≤256 px thumbnail

# JPEG candidates that pass the automatic checks yet are not photographs (reviewed by eye).
REVIEWED_NOT_PHOTO: dict[str, str] = {
    "/usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg": "digital painting",
    "/usr/share/backgrounds/mate/desktop/GreenTraditional.jpg": "logo on a gradient",
    "/usr/share/wallpapers/Autumn/contents/images/2560x1600.jpg": "painting",
    "/usr/share/wallpapers/Flow/contents/images/5120x2880.jpg": "rendered hexagons",
    "/usr/share/wallpapers/Honeywave/contents/images/5120x2880.jpg": "rendered shapes",
    "/usr/share/wallpapers/PastelHills/contents/images/3200x2000.jpg": "low-poly render",
    "/usr/share/wallpapers/SafeLanding/contents/images/5120x2880.jpg": "illustration",
    "/usr/share/wallpapers/Shell/contents/images/5120x2880.jpg": "rendered facets",
    "/usr/share/backgrounds/Fossa_by_Jasper_Roks.jpg": "rendered facets",
    "/usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg": "composited render",
    "/usr/share/backgrounds/Painting-Colors_by__herobrine7gamer.jpg": "vector stripes",
    "/usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg": "rendered colour gradient",
}

RECORDED_CSV = Path(__file__).with_name("photos.csv")
_PICTURE = re.compile(r"\.(jpe?g|png|webp)$", re.IGNORECASE)


@dataclass(frozen=True)
class PhotoRecord:
    """One recorded photograph."""

    package: str  # the Debian package that installs it
    path: str  # absolute path as installed
    sha256: str  # of the file's bytes
    width: int  # pixels, as stored (no EXIF rotation in these files)
    height: int
    split: str  # "train" or "heldout" (by package: HELDOUT_PACKAGES)


def split_of(package: str) -> str:
    return "heldout" if package in HELDOUT_PACKAGES else "train"


def laplacian_energy(image: Image.Image, side: int = 256) -> float:
    """mean |4·g(i,j) − g(i±1,j) − g(i,j±1)| over interior pixels of the luma g (0–255 scale) of a
    thumbnail whose longer side is `side` (Pillow's `thumbnail`, reducing + bicubic; a JPEG not yet
    loaded is first decoded at the smallest DCT scale that keeps both sides ≥ `side`)."""
    if image.format == "JPEG":
        image.draft("RGB", (side, side))
    im = image.convert("L")
    im.thumbnail((side, side), Image.Resampling.BICUBIC)
    g = np.asarray(im, dtype=np.float64)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.abs(lap).mean())


def photo_check(path: str | Path) -> str | None:
    """None when `path` counts as a photograph (module doc, rules 1–3), else why not."""
    path = Path(path)
    if str(path) in REVIEWED_NOT_PHOTO:
        return f"reviewed: {REVIEWED_NOT_PHOTO[str(path)]}"
    with Image.open(path) as im:
        if im.format != "JPEG":
            return f"format {im.format} (rendered or vector art in these packages)"
        energy = laplacian_energy(im)
    if energy < MIN_LAPLACIAN:
        return f"smooth gradient (Laplacian {energy:.2f} < {MIN_LAPLACIAN})"
    return None


def _package_files(package: str) -> list[Path]:
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if out.returncode != 0:
        raise FileNotFoundError(f"package {package} is not installed (run `make photos`)")
    return [Path(line) for line in out.stdout.split() if _PICTURE.search(line) and Path(line).is_file()]


def _unit(path: Path) -> str | None:
    """The wallpaper a file belongs to (one picture in several resolutions), or None for a non-candidate."""
    parts = path.parts
    if "contents" in parts:  # KDE wallpaper package: <name>/contents/images/<W>x<H>.<ext>
        i = parts.index("contents")
        return str(Path(*parts[:i])) if parts[i + 1:i + 2] == ("images",) else None
    if path.stem == "screenshot":
        return None
    return str(path.parent / re.sub(r"_\d+x\d+$", "", path.stem))


def wallpaper_candidates(package: str) -> list[Path]:
    """One file per wallpaper of an installed package: its largest picture (pixel count), sorted by path."""
    best: dict[str, tuple[int, Path]] = {}
    for f in _package_files(package):
        unit = _unit(f)
        if unit is None:
            continue
        with Image.open(f) as im:
            n = im.width * im.height
        if unit not in best or n > best[unit][0]:
            best[unit] = (n, f)
    return sorted(f for _, f in best.values())


def _thumb16(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        t = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=np.float64)
    t = t - t.mean()
    return t / (np.linalg.norm(t) + 1e-9)


def record_photos(packages=PHOTO_PACKAGES, near_duplicate: float = 0.97) -> tuple[list[PhotoRecord], list[tuple[str, str]]]:
    """(kept records, [(path, why rejected)]) over installed `packages`.

    Raises ValueError when a SHA-256 repeats or when a training photo's 16×16 luma thumbnail has
    normalised correlation ≥ `near_duplicate` with a held-out one (the same picture on both sides).
    """
    kept, rejected = [], []
    for package in packages:
        for f in wallpaper_candidates(package):
            why = photo_check(f)
            if why:
                rejected.append((str(f), why))
                continue
            with Image.open(f) as im:
                w, h = im.size
            kept.append(PhotoRecord(package, str(f), file_sha256(f), w, h, split_of(package)))
    hashes = [r.sha256 for r in kept]
    if len(set(hashes)) != len(hashes):
        raise ValueError("the same file is recorded twice")
    train = [r for r in kept if r.split == "train"]
    held = [r for r in kept if r.split == "heldout"]
    if train and held:
        corr = np.stack([_thumb16(r.path).ravel() for r in train]) @ np.stack([_thumb16(r.path).ravel() for r in held]).T
        i, j = np.unravel_index(int(corr.argmax()), corr.shape)
        if corr[i, j] >= near_duplicate:
            raise ValueError(f"{train[i].path} looks like held-out {held[j].path} (correlation {corr[i, j]:.3f})")
    return kept, rejected


def write_records(records: list[PhotoRecord], path: str | Path | None = None) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(PhotoRecord)], lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(asdict(r))
    return atomic_write_text(path or RECORDED_CSV, buf.getvalue())


def recorded_photos(split: str | None = None, path: str | Path | None = None) -> list[PhotoRecord]:
    """The recorded list (default `RECORDED_CSV`; no package needed), optionally one split ("train" / "heldout")."""
    with open(path or RECORDED_CSV, newline="") as fh:
        rows = [PhotoRecord(r["package"], r["path"], r["sha256"], int(r["width"]), int(r["height"]), r["split"])
                for r in csv.DictReader(fh)]
    if split is not None:
        if split not in ("train", "heldout"):
            raise ValueError(f"split is 'train' or 'heldout', not {split!r}")
        rows = [r for r in rows if r.split == split]
    return rows


def check_installed(records: list[PhotoRecord]) -> list[str]:
    """Problems with the installed files (missing, SHA-256 differs); empty when all match."""
    problems = []
    for r in records:
        p = Path(r.path)
        if not p.is_file():
            problems.append(f"{r.path}: missing (package {r.package}; run `make photos`)")
        elif file_sha256(p) != r.sha256:
            problems.append(f"{r.path}: SHA-256 differs from the recorded one (package {r.package} changed version?)")
    return problems


def installed_photos(split: str) -> list[PhotoRecord]:
    """The recorded photos of `split`, after checking that every one is installed and unchanged
    (FileNotFoundError naming `make photos` otherwise)."""
    records = recorded_photos(split)
    problems = check_installed(records)
    if problems:
        raise FileNotFoundError(f"{len(problems)} recorded photo(s) unavailable (run `make photos`); first: {problems[0]}")
    return records


def load_reduced(path: str | Path, shorter: int) -> Image.Image:
    """A photo decoded (encoder.image, via load_image) and, when larger, reduced with Lanczos so that
    its shorter side is `shorter` (the benchmark's and the demo training's view of a wallpaper)."""
    from ..image import to_pil
    from .folder import load_image

    im = to_pil(load_image(str(path)))
    f = shorter / min(im.size)
    if f < 1:
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.LANCZOS)
    return im


def main(argv: list[str] | None = None) -> int:
    """`python -m encoder.data.photos packages|check|record`: the packages to install, check the installed
    files against photos.csv (what `make photos` runs), or rewrite photos.csv from the installed packages."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m encoder.data.photos", description=main.__doc__)
    p.add_argument("action", choices=("packages", "check", "record"))
    args = p.parse_args(argv)
    if args.action == "packages":
        print(" ".join(PHOTO_PACKAGES))
        return 0
    if args.action == "record":
        kept, rejected = record_photos()
        for path, why in rejected:
            print(f"not a photo: {path}: {why}")
        write_records(kept)
        print(f"recorded {len(kept)} photos in {RECORDED_CSV}")
        return 0
    records = recorded_photos()
    problems = check_installed(records)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 2
    by = {s: sum(r.split == s for r in records) for s in ("train", "heldout")}
    print(f"{len(records)} recorded photos present and unchanged ({by['train']} train, {by['heldout']} held out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
