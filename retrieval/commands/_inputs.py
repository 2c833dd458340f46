"""Query arguments → image files, for commands that take many queries (`robret attack`).

Each argument is a file (kept as given, whatever its suffix), a folder (every image under it,
recursively, by `encoder.image.is_image_name`, in sorted order) or `@LIST` (a text file of paths, one
per line; blank lines and lines starting with `#` skipped; relative paths are relative to the current
directory, as for xargs). Arguments are expanded in order; a path named twice is kept once.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["expand_images"]


def _walk(folder: Path) -> list[Path]:
    from encoder.image import is_image_name

    found = []
    for root, dirs, files in os.walk(folder):  # symlinked folders are not followed (os.walk's default)
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if is_image_name(f)]
    return found


def expand_images(items: list[str]) -> list[Path]:
    """The image files named by `items` (module doc). ValueError names an argument that is missing,
    an unreadable list, or a folder without images."""
    out: dict[Path, None] = {}
    for item in items:
        if item.startswith("@"):
            listing = Path(item[1:])
            try:
                lines = listing.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read the list {listing}: {exc}") from None
            paths = [Path(s.strip()) for s in lines if s.strip() and not s.lstrip().startswith("#")]
        elif Path(item).is_dir():
            paths = _walk(Path(item))
            if not paths:
                raise ValueError(f"the folder {item} holds no image files")
        elif Path(item).exists():
            paths = [Path(item)]
        else:
            raise ValueError(f"query image {item!r} does not exist")
        for p in paths:
            out.setdefault(p, None)
    return list(out)
