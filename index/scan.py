"""Walk an image folder safely: image files by extension, symlinks confined to the root, no loops.

Paths are handled as bytes end to end, so file names that are not valid UTF-8 are indexed like any
other (their display form escapes the bad bytes). Rules:
- hidden entries (name starting with ".") are skipped, and so is the index directory itself;
- a symlink is followed only if its target resolves inside the root; otherwise an image-named link
  becomes a failed entry (`symlink_escape`, `symlink_broken`), a directory link a warning;
- each real directory is entered once (by device and inode): a link back to an ancestor, or two
  names for one directory, cannot loop or duplicate;
- an image-named entry that is not a regular file (a FIFO, a socket) is a failed entry, never opened;
- a directory that cannot be listed is reported and marked *protected*: files under it are not
  treated as deleted.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field

from .decode import DecodeError, IMAGE_EXTENSIONS, is_inside
from .errors import FolderError

__all__ = ["ScanEntry", "ScanResult", "scan_folder", "display_path", "shown_path"]

log = logging.getLogger(__name__)
_EXTENSIONS = tuple(os.fsencode(e) for e in IMAGE_EXTENSIONS)


def display_path(key: bytes) -> str:
    """A relative path's bytes as text; bytes that are not UTF-8 show as \\xNN."""
    return key.decode("utf-8", "backslashreplace")


def shown_path(path: str | bytes | os.PathLike) -> str:
    """A path as text to show or to write in JSON: `display_path` of its bytes (a name that is not UTF-8, which
    Python holds with surrogates, shows as \\xNN instead of a lone surrogate no JSON encoder accepts)."""
    return display_path(os.fsencode(path))


@dataclass
class ScanEntry:
    key: bytes  # path relative to the root, raw bytes, "/"-separated
    path: bytes  # absolute path to open (through the symlink, if any)
    size: int | None
    mtime_ns: int | None
    problem: DecodeError | None = None  # set when the entry must not be opened
    notes: list[str] = field(default_factory=list)

    @property
    def display(self) -> str:
        return display_path(self.key)


@dataclass
class ScanResult:
    root: bytes
    entries: list[ScanEntry]
    protected: list[bytes]  # relative directories that could not be listed
    warnings: list[str]
    ignored: int  # non-image and hidden entries


NOT_IMAGE = f"not named as an image ({', '.join(sorted(IMAGE_EXTENSIONS))})"  # a `not_image` failure's detail


def is_image_name(name: bytes | str) -> bool:
    """Whether a file name (bytes) or object key (str) ends in an image extension (IMAGE_EXTENSIONS)."""
    return os.fsencode(name).lower().endswith(_EXTENSIONS)


def scan_folder(root: str | os.PathLike | bytes, exclude: tuple[str | os.PathLike, ...] = ()) -> ScanResult:
    """Every image-named file under `root` (sorted), with problems attached instead of raised."""
    root_b = os.path.abspath(os.fsencode(root))
    if not os.path.isdir(root_b):
        what = "does not exist" if not os.path.lexists(root_b) else "is not a directory"
        raise FolderError(f"image folder {os.fsdecode(root_b)!r} {what}")
    root_real = os.path.realpath(root_b)
    excluded = set()
    for p in exclude:
        try:
            st = os.stat(os.fsencode(p))
            excluded.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    st_root = os.stat(root_b)
    visited = {(st_root.st_dev, st_root.st_ino)}
    result = ScanResult(root=root_b, entries=[], protected=[], warnings=[], ignored=0)
    stack: list[tuple[bytes, bytes]] = [(root_b, b"")]

    def warn(rel: bytes, message: str) -> None:
        text = f"{display_path(rel) or '.'}: {message}"
        result.warnings.append(text)
        log.warning("%s", text)

    while stack:
        dir_abs, dir_rel = stack.pop()
        try:
            with os.scandir(dir_abs) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            warn(dir_rel, f"cannot list directory ({exc.strerror or exc}); its files are left as they were")
            result.protected.append(dir_rel)
            continue
        subdirs = []
        for e in entries:
            name = e.name
            rel = dir_rel + b"/" + name if dir_rel else name
            if name.startswith(b"."):
                result.ignored += 1
                continue
            is_link = False
            try:
                is_link = e.is_symlink()
                st = os.stat(e.path) if is_link else e.stat(follow_symlinks=False)
            except FileNotFoundError:
                if is_link and is_image_name(name):
                    result.entries.append(_problem(rel, e.path, "symlink_broken", "symbolic link to a missing file"))
                elif is_link:
                    warn(rel, "broken symbolic link to a directory, skipped")
                continue
            except OSError as exc:
                if is_image_name(name):
                    kind = "symlink_loop" if is_link else "unreadable"
                    result.entries.append(_problem(rel, e.path, kind, exc.strerror or str(exc)))
                else:
                    warn(rel, f"skipped ({exc.strerror or exc})")
                continue
            if is_link:
                target = os.path.realpath(e.path)
                if not is_inside(target, root_real):
                    detail = f"symbolic link leaves the indexed folder (→ {display_path(target)})"
                    if stat.S_ISDIR(st.st_mode):
                        warn(rel, detail + ", not followed")
                    elif is_image_name(name):
                        result.entries.append(_problem(rel, e.path, "symlink_escape", detail))
                    else:
                        result.ignored += 1
                    continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in excluded:
                    result.ignored += 1
                elif key in visited:
                    warn(rel, "directory already visited (symlink loop or second name), not followed")
                else:
                    visited.add(key)
                    subdirs.append((e.path, rel))
                continue
            if not is_image_name(name):
                result.ignored += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                result.entries.append(_problem(rel, e.path, "not_regular", "not a regular file (device, FIFO or socket)"))
                continue
            entry = ScanEntry(key=rel, path=e.path, size=st.st_size, mtime_ns=st.st_mtime_ns)
            try:
                rel.decode("utf-8")
            except UnicodeDecodeError:
                entry.notes.append("file name is not valid UTF-8 (shown with \\x escapes)")
                log.info("%s: file name is not valid UTF-8", entry.display)
            result.entries.append(entry)
        stack.extend(reversed(subdirs))
    result.entries.sort(key=lambda en: en.key)
    return result


def _problem(rel: bytes, path: bytes, kind: str, detail: str) -> ScanEntry:
    try:
        st = os.lstat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = None
    return ScanEntry(key=rel, path=path, size=size, mtime_ns=mtime, problem=DecodeError(kind, detail))
