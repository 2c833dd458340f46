"""An object-store prefix or a list of object URIs as scan entries (index/scan.py's vocabulary).

A bucket prefix is listed recursively (index/remote.py `list_objects`: size and mtime per object, what
an update compares); listed URIs are asked for their size and mtime in one `get_file_info` call.
Each entry is keyed by its key relative to the root, as a folder's files are by their relative path,
so a prefix holding a folder's files builds the same rows and vectors as the folder. The rules follow
the folder scan's: hidden names (a segment starting with ".") and names that are not images are
ignored in a listing; keys that could name another object (`unsafe_name`: "..", ".", empty segments,
control characters, backslashes) are failures, never read; a listed URI outside the root is
`outside_root`, a listed URI that is not named as an image `not_image`, a missing one `missing`.
"""
from __future__ import annotations

import posixpath
import re

from .decode import DecodeError
from .remote import RemoteSourceError, RemoteURI, filesystem, is_remote, list_objects, parse_uri, relative_key, unsafe_key
from .scan import NOT_IMAGE, ScanEntry, ScanResult, is_image_name

__all__ = ["scan_prefix", "scan_uris", "common_prefix", "redact"]

_USERINFO = re.compile(r"^([A-Za-z0-9+.-]+://)[^/@]*@")


def redact(text: str) -> str:
    """A URI with any user information (credentials) replaced by "***"."""
    return _USERINFO.sub(r"\1***@", text)


def _failed(key: str, path: str, kind: str, detail: str, size=None, mtime_ns=None) -> ScanEntry:
    return ScanEntry(key=key.encode("utf-8", "surrogateescape"), path=path.encode("utf-8", "surrogateescape"),
                     size=size, mtime_ns=mtime_ns, problem=DecodeError(kind, detail))


def scan_prefix(root: bytes | str) -> ScanResult:
    """Every image-named object under the root URI, sorted by key (RemoteSourceError when it cannot be
    listed)."""
    uri = parse_uri(root)
    result = ScanResult(root=str(uri).encode(), entries=[], protected=[], warnings=[], ignored=0)
    for rel, size, mtime_ns in list_objects(uri):
        problem = unsafe_key(rel)
        if not is_image_name(rel) or (problem is None and any(p.startswith(".") for p in rel.split("/"))):
            result.ignored += 1
            continue
        path = str(uri.child(rel))
        if problem:
            result.entries.append(_failed(rel, path, "unsafe_name", problem, size, mtime_ns))
            continue
        result.entries.append(ScanEntry(key=rel.encode(), path=path.encode(), size=size, mtime_ns=mtime_ns))
    return result


def scan_uris(entries: list[str], root: bytes | str) -> ScanResult:
    """Scan entries for listed object URIs under the root URI (module doc), sorted by key."""
    import pyarrow.fs as pafs

    base = parse_uri(root)
    result = ScanResult(root=str(base).encode(), entries=[], protected=[], warnings=[], ignored=0)
    found: list[tuple[str, RemoteURI]] = []
    seen: set[bytes] = set()
    for text in entries:
        failed, uri, rel = _listed(text, base)
        key = failed.key if failed is not None else rel.encode()
        if key in seen:
            result.warnings.append(f"{key.decode('utf-8', 'backslashreplace')}: listed more than once, indexed once")
            continue
        seen.add(key)
        if failed is not None:
            result.entries.append(failed)
        else:
            found.append((rel, uri))
    if found:
        try:
            infos = filesystem(base.scheme).get_file_info([uri.fs_path for _, uri in found])
        except (OSError, ValueError) as exc:
            raise RemoteSourceError(f"cannot ask {base} for the listed objects: {str(exc).splitlines()[0]}") from None
        for (rel, uri), info in zip(found, infos):
            if info.type == pafs.FileType.NotFound:
                result.entries.append(_failed(rel, str(uri), "missing", "listed object does not exist"))
            elif info.type != pafs.FileType.File:
                result.entries.append(_failed(rel, str(uri), "not_regular",
                                              "a prefix, not an object (list its objects, or index the prefix itself)"))
            else:
                result.entries.append(ScanEntry(key=rel.encode(), path=str(uri).encode(), size=int(info.size),
                                                mtime_ns=int(info.mtime_ns or 0)))
    result.entries.sort(key=lambda en: en.key)
    return result


def _listed(text: str, base: RemoteURI) -> tuple[ScanEntry | None, RemoteURI | None, str | None]:
    """(a failed entry, None, None) for a listed text that must not be read, else (None, URI, relative key)."""
    shown = redact(text)
    if not is_remote(text):
        return _failed(shown, shown, "outside_root", f"listed path lies outside the indexed root {base}"), None, None
    try:
        uri = parse_uri(text)
    except RemoteSourceError as exc:
        return _failed(shown, shown, "unsafe_name", str(exc)), None, None
    rel = relative_key(uri, base)
    if rel is None:
        return _failed(shown, shown, "outside_root", f"listed object lies outside the indexed root {base}"), None, None
    if problem := unsafe_key(rel):
        return _failed(rel, str(uri), "unsafe_name", problem), None, None
    if not is_image_name(rel):
        return _failed(rel, str(uri), "not_image", NOT_IMAGE), None, None
    return None, uri, rel


def common_prefix(uris: list[str]) -> bytes:
    """The deepest prefix holding every listed object URI (all in one bucket), as a root URI."""
    parsed = [parse_uri(u) for u in uris]
    buckets = {(u.scheme, u.bucket) for u in parsed}
    if len(buckets) != 1:
        raise RemoteSourceError("the listed objects lie in more than one bucket: give the indexed root with --root")
    scheme, bucket = buckets.pop()
    return str(RemoteURI(scheme, bucket, posixpath.commonpath([posixpath.dirname(u.key) for u in parsed]))).encode()
