"""What `robret index build` indexes: a folder, a list of files (`@files.txt`), or a Parquet table of paths.

    build_index("photos/", ...)                       # a folder, recursively (index/scan.py)
    build_index("@files.txt", ..., root="photos/")    # one path per line
    build_index("files.parquet", ...)                 # a string column `path`
    build_index("file:///data/photos", ...)           # file:// URIs wherever a local path goes
    build_index("s3://bucket/photos", ...)            # an object-store prefix (s3://, gs://), recursively
    build_index("@uris.txt", ..., root="s3://bucket/photos")   # a list of object URIs

The indexed root
----------------
Every file robret reads or shows lies inside one directory, the *root* (issue 12 item 3): checked when
the source is listed, and again on the opened descriptor at every read (index/decode.py `read_bytes`),
by the indexer, its Ray actors, queries by id and the UI. For a folder the root is the folder. For a
list it is `root` (`--root`) when given, else the deepest directory that contains every listed file; an
inferred root of `/` is refused (give `--root`). The root is recorded at build and never changes.

Entries
-------
Relative entries are relative to the list file's directory (not to the working directory, so that
`update` reads the same list from anywhere); blank lines are skipped; `file://` URIs are local paths.
Each entry becomes a row keyed, as a folder's files are, by its path relative to the root, so a list of
a folder's image files builds the same index (same ids, paths, vectors) as the folder itself. An entry
that cannot be indexed is a failed entry with its reason, never a fatal error: outside the root
(`outside_root`; also an object URI under a local root, a local path under an object-store root),
missing (`missing`), a directory or another non-regular file (`not_regular`), resolving outside the root
through a symlink (`symlink_escape`), inside the index directory (`index_dir`), not named as an image
(`not_image`), or an object key that could name another object (`unsafe_name`). A path listed twice is
indexed once (a warning).

Update
------
The catalog records the source (`meta["source"]`: kind, absolute path of the list file); `robret index
update` reads the list again: new entries are indexed, changed files re-embedded, and entries no longer
listed removed (tombstoned), exactly as files deleted from a folder. A list file that has gone is an
error (nothing is removed).

Object stores
-------------
An `s3://` or `gs://` prefix is a source like a folder (its root is the prefix, listed recursively), and
a list may name object URIs under an object-store `--root` (default: the deepest prefix holding every
listed object; they must all be in one bucket). Listing and confinement are index/remote.py and
index/remote_scan.py; every read goes through index/decode.py `read_bytes`, which hands a URI to
`remote.read_object`. The list file itself is local. Other fsspec schemes are refused with a message.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from .decode import is_inside
from .errors import FolderError
from .remote import is_remote
from .scan import NOT_IMAGE, ScanEntry, ScanResult, _problem as _failed, display_path, is_image_name, scan_folder

__all__ = ["Source", "resolve_source", "read_entries", "scan_source", "local_path", "SOURCE_KINDS"]

log = logging.getLogger(__name__)
SOURCE_KINDS = ("folder", "list", "parquet")
PARQUET_COLUMN = "path"


class RemoteURIError(FolderError):
    """A URI of a file system other than the local one."""


def local_path(text: str | os.PathLike | bytes) -> str | bytes:
    """A local path, or a `file://` URI as a local path (fsspec's reading of it); RemoteURIError for
    any other URI scheme (s3://, gs://, http://, …)."""
    if isinstance(text, (bytes, os.PathLike)):
        return os.fspath(text)
    if "://" not in text:
        return text
    from fsspec.core import split_protocol, url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    protocol, _ = split_protocol(text)
    if protocol not in ("file", "local"):
        from .remote_scan import redact

        where = "an object-store URI, not a local path" if is_remote(text) else \
            f"{protocol}:// is not supported (local paths, file://, s3:// and gs:// are)"
        raise RemoteURIError(f"{redact(text)!r}: {where}")
    fs, path = url_to_fs(text)
    assert isinstance(fs, LocalFileSystem)
    return path


@dataclass(frozen=True)
class Source:
    """An indexed source: its kind, its root (absolute, bytes) and, for a list, the list file."""

    kind: str  # one of SOURCE_KINDS
    root: bytes  # the indexed root: every file read must resolve inside it
    list_path: str | None = None  # absolute path of the list or Parquet file (kind list | parquet)

    def to_meta(self) -> dict:
        """What the catalog records (`meta["source"]`); the root is recorded as `meta["root"]`."""
        return {"kind": self.kind, "list": self.list_path}

    @classmethod
    def from_meta(cls, meta: dict) -> "Source":
        """The source a catalog records (catalogs written before lists existed index a folder)."""
        source = meta.get("source") or {"kind": "folder"}
        return cls(source.get("kind", "folder"), os.fsencode(meta["root"]), source.get("list"))

    def describe(self) -> str:
        root = display_path(self.root)
        return root if self.kind == "folder" else f"{self.list_path} (root {root})"


def resolve_source(arg, root=None) -> Source:
    """The command line's SOURCE (a folder, `@list`, `.parquet`, or their file:// URIs) and `--root`.

    FolderError (a ValueError) with the reason when the source cannot be used at all.
    """
    if is_remote(arg):
        return _remote_prefix(arg, root)
    if isinstance(arg, str) and arg.startswith("@"):
        kind, path = "list", local_path(arg[1:])
    else:
        path = local_path(arg)
        is_parquet = os.fsdecode(path).lower().endswith(".parquet") and not os.path.isdir(path)
        kind = "parquet" if is_parquet else "folder"
    path = os.path.abspath(path)
    if kind == "folder":
        root_b = os.fsencode(path)
        if root is not None and os.path.abspath(os.fsencode(local_path(root))) != root_b:
            raise FolderError("--root is for a list of files (@FILE or .parquet); a folder is its own root")
        if not os.path.isdir(root_b):
            scan_folder(root_b)  # raises FolderError with the precise reason
        return Source("folder", root_b)
    path = os.fsdecode(path)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.lexists(path) else "is not a regular file"
        raise FolderError(f"list of files {path!r} {what}")
    if root is not None and is_remote(root):
        root_b = _remote_root(root)
    elif root is not None:
        root_b = os.path.abspath(os.fsencode(local_path(root)))
        if not os.path.isdir(root_b):
            raise FolderError(f"--root {os.fsdecode(root_b)!r} is not a directory")
    else:
        root_b = _common_root(path, read_entries(kind, path))
    return Source(kind, root_b, path)


def _remote_root(text) -> bytes:
    """An object-store root (index/remote.py), checked to be reachable; as recorded (bytes)."""
    from .remote import check_prefix, root_uri

    uri = root_uri(os.fsdecode(text))
    check_prefix(uri)
    return str(uri).encode()


def _remote_prefix(arg, root) -> Source:
    root_b = _remote_root(arg)
    if root is not None and (not is_remote(root) or _remote_root(root) != root_b):
        raise FolderError("--root is for a list of files (@FILE or .parquet); a bucket prefix is its own root")
    return Source("folder", root_b)


def _common_root(list_path: str, entries: list[str]) -> bytes:
    base = os.path.dirname(os.fsencode(list_path))
    dirs, uris = [], []
    for text in entries:
        if is_remote(text):
            uris.append(text)
            continue
        try:
            dirs.append(os.path.dirname(_absolute(text, base)))
        except RemoteURIError:
            continue
    if uris and dirs:
        raise FolderError(f"{list_path!r} lists both local files and object URIs: give the indexed root with --root "
                          "(entries outside it are refused)")
    if uris:
        from .remote_scan import common_prefix

        return _remote_root(common_prefix(uris))
    if not dirs:
        raise FolderError(f"{list_path!r} names no file and no object: nothing to index")
    root = os.path.commonpath(dirs)
    if root == b"/":
        raise FolderError(f"the files listed in {list_path!r} have no common directory but / : give the "
                          "indexed root with --root DIR (files outside it are refused)")
    return root


def _absolute(text: str, base: bytes) -> bytes:
    return os.path.normpath(os.path.join(base, os.fsencode(local_path(text))))


def read_entries(kind: str, list_path: str) -> list[str]:
    """The entries of a list file (one per line, blank lines skipped; undecodable bytes kept through
    surrogateescape) or of a Parquet file's `path` column (its only string column if it has no `path`)."""
    try:
        if kind == "list":
            with open(list_path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                return [line.rstrip("\r\n") for line in f if line.strip()]
        return _parquet_entries(list_path)
    except OSError as exc:
        raise FolderError(f"cannot read the list of files {list_path!r} ({exc.strerror or exc})") from None


def _parquet_entries(path: str) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FolderError("reading a Parquet list of files needs pyarrow: pip install 'robret[inputs]'") from None
    try:
        schema = pq.read_schema(path)
    except pa.ArrowException as exc:
        raise FolderError(f"{path!r} is not a readable Parquet file ({exc})") from None
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    column = PARQUET_COLUMN if PARQUET_COLUMN in schema.names else (strings[0] if len(strings) == 1 else None)
    if column is None or column not in strings:
        raise FolderError(f"{path!r} needs a string column {PARQUET_COLUMN!r} with the files' paths "
                          f"(its columns: {', '.join(schema.names)})")
    return [v for v in pq.read_table(path, columns=[column]).column(column).to_pylist() if v and v.strip()]


def scan_source(source: Source, exclude: tuple = ()) -> ScanResult:
    """The files of `source` as scan entries (index/scan.py), problems attached instead of raised."""
    if source.kind == "folder" and is_remote(source.root):
        from .remote_scan import scan_prefix

        return scan_prefix(source.root)
    if source.kind == "folder":
        return scan_folder(source.root, exclude=exclude)
    if source.kind not in SOURCE_KINDS:
        raise FolderError(f"unknown source kind {source.kind!r} recorded in the catalog")
    if not os.path.isfile(source.list_path):
        raise FolderError(f"the list of files {source.list_path!r} this index was built from is gone; nothing "
                          "was changed")
    entries = read_entries(source.kind, source.list_path)
    if is_remote(source.root):
        from .remote_scan import scan_uris

        return scan_uris(entries, source.root)
    return scan_list(entries, os.path.dirname(os.fsencode(source.list_path)), source.root, exclude)


def scan_list(entries: list[str], base: bytes, root: bytes, exclude: tuple = ()) -> ScanResult:
    """Scan entries for listed files (module doc, "Entries"), sorted by key as a folder scan's."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FolderError(f"indexed root {os.fsdecode(root)!r} does not exist or is not a directory")
    root_real = os.path.realpath(root)
    excluded = [os.path.realpath(os.fsencode(p)) for p in exclude]
    result = ScanResult(root=root, entries=[], protected=[], warnings=[], ignored=0)
    seen: set[bytes] = set()
    for text in entries:
        entry = _list_entry(text, base, root, root_real, excluded)
        if entry.key in seen:
            result.warnings.append(f"{entry.display}: listed more than once, indexed once")
            continue
        seen.add(entry.key)
        result.entries.append(entry)
    result.entries.sort(key=lambda en: en.key)
    return result


def _list_entry(text: str, base: bytes, root: bytes, root_real: bytes, excluded: list[bytes]) -> ScanEntry:
    try:
        path = _absolute(text, base)
    except RemoteURIError as exc:  # an object URI (or another scheme) under a local root
        from .remote_scan import redact

        shown = os.fsencode(redact(text))
        return _failed(shown, shown, "outside_root", f"{str(exc).split(': ', 1)[-1]}: outside the indexed root "
                       f"{display_path(root)}")
    if not is_inside(path, root):
        return _failed(path, path, "outside_root", f"listed file lies outside the indexed root {display_path(root)}")
    key = os.path.relpath(path, root).replace(os.sep.encode(), b"/")
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return _failed(key, path, "missing", "listed file does not exist")
    except OSError as exc:
        return _failed(key, path, "unreadable", exc.strerror or str(exc))
    real = os.path.realpath(path)
    if any(is_inside(real, ex) for ex in excluded):
        return _failed(key, path, "index_dir", "inside the index directory")
    if not is_inside(real, root_real):
        return _failed(key, path, "symlink_escape",
                       f"resolves outside the indexed root (→ {display_path(real)})")
    try:
        st = os.stat(path) if stat.S_ISLNK(lst.st_mode) else lst
    except OSError as exc:
        return _failed(key, path, "symlink_broken", f"symbolic link to a missing file ({exc.strerror or exc})")
    if stat.S_ISDIR(st.st_mode):
        return _failed(key, path, "not_regular", "is a directory (list its files, or index the folder itself)")
    if not stat.S_ISREG(st.st_mode):
        return _failed(key, path, "not_regular", "not a regular file (device, FIFO or socket)")
    if not is_image_name(key):
        return _failed(key, path, "not_image", NOT_IMAGE)
    entry = ScanEntry(key=key, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        entry.notes.append("file name is not valid UTF-8 (shown with \\x escapes)")
    return entry

