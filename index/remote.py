"""Object stores as image sources: `s3://bucket/prefix` and `gs://bucket/prefix`, read through pyarrow.fs.

    uri = parse_uri("s3://photos/2024")                 # RemoteURI(scheme="s3", bucket="photos", key="2024")
    listing = list_objects(uri)                       # [(relative key, size, mtime_ns)], recursively
    data = read_object("s3://photos/2024/a.png", max_bytes, root="s3://photos/2024")

Where the store is
------------------
S3 (`pyarrow.fs.S3FileSystem`): the endpoint is `ROBRET_S3_ENDPOINT`, else `AWS_ENDPOINT_URL_S3`, else
`AWS_ENDPOINT_URL` (none: AWS itself); the region `AWS_REGION` / `AWS_DEFAULT_REGION` (default
us-east-1). GCS (`pyarrow.fs.GcsFileSystem`): `STORAGE_EMULATOR_HOST` points at an emulator.
`ROBRET_ANONYMOUS=1` reads public buckets without credentials.

Credentials
-----------
Only the SDKs' own chains supply them (environment variables, shared credential files, instance or
workload identity). robret never takes them as arguments, refuses a URI that carries any
(`s3://KEY:SECRET@bucket/…`), and records only the bucket URI (catalog, robret-index.json): nothing it writes
or prints can hold a secret. Error messages name the URI, never the endpoint's user information.

Listing and updates
-------------------
A prefix is listed recursively (one paginated LIST); each object's size and last-modified time stand for
a file's size and mtime, so `update` rules are the folder's. Object stores keep last-modified to the
second: an object rewritten with the same size within the second of its previous listing is seen as
unchanged until it changes again (`repair` skips it too; a build into a new --index-dir reads all).

Confinement
-----------
A key is read only when it lies under the indexed root and is *safe*: no empty, "." or ".." segment
(pyarrow normalises "a/../b" to "b", so such a key would read another object), no control character
and no backslash. Anything else is a DecodeError (`outside_root`, `unsafe_name`) before any request.
`read_object` asks for the object's size first and refuses one above the limit (`too_large`) before
reading it, then reads at most limit + 1 bytes (an object replaced meanwhile cannot make it read more).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from encoder.image import DecodeError, check_header

from .errors import FolderError

__all__ = ["SCHEMES", "RemoteURI", "RemoteSourceError", "is_remote", "parse_uri", "filesystem", "list_objects",
           "read_object", "relative_key", "unsafe_key", "root_uri", "check_prefix", "settings", "SETTINGS_ENV"]

log = logging.getLogger(__name__)
SCHEMES = ("s3", "gs")
# Where the stores are and how to reach them (no secrets): forwarded to Ray actors as they are.
SETTINGS_ENV = ("ROBRET_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                "STORAGE_EMULATOR_HOST", "ROBRET_ANONYMOUS")
_PREFIXES = tuple(f"{s}://" for s in SCHEMES)
_PREFIXES_B = tuple(p.encode() for p in _PREFIXES)


class RemoteSourceError(FolderError):
    """An object-store URI or bucket that cannot be used (malformed, unreachable, no such bucket)."""


@dataclass(frozen=True)
class RemoteURI:
    """`scheme://bucket/key`; key without leading or trailing "/" ("" for the whole bucket)."""

    scheme: str  # "s3" | "gs"
    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    @property
    def fs_path(self) -> str:
        """The path pyarrow.fs names it by: `bucket/key`."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def child(self, rel: str) -> "RemoteURI":
        return RemoteURI(self.scheme, self.bucket, f"{self.key}/{rel}" if self.key else rel)


def is_remote(path) -> bool:
    """True for an `s3://` or `gs://` URI (str, bytes or PathLike); cheap, imports nothing."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes):
        return path.lower().startswith(_PREFIXES_B)
    return isinstance(path, str) and path.lower().startswith(_PREFIXES)


def parse_uri(text: str | bytes) -> RemoteURI:
    """`s3://bucket/prefix` → RemoteURI; RemoteSourceError for a malformed URI or one carrying credentials
    (the message never repeats them). Trailing "/" are dropped; the key is otherwise kept as written."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise RemoteSourceError(f"not an object-store URI (s3://BUCKET/PREFIX or gs://BUCKET/PREFIX): {text!r}")
    netloc, _, key = rest.partition("/")
    if "@" in netloc or ":" in netloc:
        raise RemoteSourceError(f"{scheme}:// URI with credentials or a port in its bucket name refused: give "
                                "credentials through the environment (AWS_* / GOOGLE_APPLICATION_CREDENTIALS), "
                                "never in a URI")
    if not netloc:
        raise RemoteSourceError(f"{text!r} names no bucket ({scheme}://BUCKET/PREFIX)")
    if "?" in key or "#" in key:
        raise RemoteSourceError(f"{text!r}: query strings and fragments are not part of an object key")
    return RemoteURI(scheme, netloc, key.strip("/"))


def root_uri(text: str | bytes) -> RemoteURI:
    """`parse_uri` for an indexed root: also refused when its prefix could name another one ("..", …)."""
    uri = parse_uri(text)
    if uri.key and (problem := unsafe_key(uri.key)):
        raise RemoteSourceError(f"{uri} cannot be an indexed root: {problem}")
    return uri


def unsafe_key(rel: str) -> str | None:
    """Why a key (relative to the root) must not be read, or None: empty/"."/".." segments (an absolute
    key is an empty first segment), control characters, backslashes."""
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "control character in the object key"
    if "\\" in rel:
        return "backslash in the object key"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "empty, '.' or '..' segment in the object key (it could name another object)"
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def settings(scheme: str) -> tuple:
    """The non-secret settings a file system is built from (the cache key of `filesystem`)."""
    if scheme == "s3":
        endpoint = (os.environ.get("ROBRET_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL") or None)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    else:
        endpoint, region = os.environ.get("STORAGE_EMULATOR_HOST") or None, None
    return scheme, endpoint, region, _env_flag("ROBRET_ANONYMOUS")


def filesystem(scheme: str):
    """The pyarrow file system for `scheme` under the current environment (module doc), built once per
    distinct setting."""
    return _filesystem(*settings(scheme))


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, endpoint: str | None, region: str | None, anonymous: bool):
    import pyarrow.fs as pafs

    kwargs = {}
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = _endpoint(endpoint)
    if scheme == "s3":
        return pafs.S3FileSystem(region=region, anonymous=anonymous, **kwargs)
    # An emulator takes no credentials; the real GCS reads them from the usual chain.
    return pafs.GcsFileSystem(anonymous=anonymous or bool(endpoint), retry_time_limit=timedelta(seconds=30), **kwargs)


def _endpoint(endpoint: str) -> tuple[str, str]:
    """(scheme, host[:port]) of an endpoint setting ("http://host:port" or "host:port"), never its user
    information."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    return parts.scheme or "https", parts.hostname + (f":{parts.port}" if parts.port else "")


def _where(uri: RemoteURI) -> str:
    endpoint = settings(uri.scheme)[1]
    return f" at {_endpoint(endpoint)[1]}" if endpoint else ""


def _error_text(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def check_prefix(uri: RemoteURI) -> None:
    """RemoteSourceError unless the bucket can be reached (the prefix itself may be empty)."""
    import pyarrow.fs as pafs

    try:
        info = filesystem(uri.scheme).get_file_info(uri.bucket)
    except (OSError, ValueError) as exc:
        raise RemoteSourceError(f"cannot reach {uri.scheme}://{uri.bucket}{_where(uri)}: {_error_text(exc)}") from None
    if info.type == pafs.FileType.NotFound:
        raise RemoteSourceError(f"bucket {uri.scheme}://{uri.bucket} does not exist{_where(uri)}")


def list_objects(root: RemoteURI) -> list[tuple[str, int, int]]:
    """Every object under `root`, recursively: (key relative to the root, size, mtime_ns), sorted by key.

    RemoteSourceError when the bucket cannot be listed. Unsafe keys are listed too (the caller reports
    them); "directories" are not objects and are left out."""
    import pyarrow.fs as pafs

    check_prefix(uri=root)
    selector = pafs.FileSelector(root.fs_path, recursive=True, allow_not_found=True)
    try:
        infos = filesystem(root.scheme).get_file_info(selector)
    except (OSError, ValueError) as exc:
        raise RemoteSourceError(f"cannot list {root}{_where(root)}: {_error_text(exc)}") from None
    base = root.fs_path + "/"
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(base):
            continue
        out.append((info.path[len(base):], int(info.size), int(info.mtime_ns or 0)))
    return sorted(out)


def confine(path: str | bytes, root: str | bytes | None) -> RemoteURI:
    """The URI `path`, checked against `root` (DecodeError outside_root | unsafe_name) before any request."""
    try:
        uri = parse_uri(path)
    except RemoteSourceError as exc:
        raise DecodeError("unsafe_name", str(exc)) from None
    if root is None:
        rel = uri.key
    else:
        base = parse_uri(root)
        rel = relative_key(uri, base)
        if rel is None:
            raise DecodeError("outside_root", f"object lies outside the indexed root {base}")
    problem = unsafe_key(uri.key) or (None if rel else "names the root itself, not an object under it")
    if problem:
        raise DecodeError("unsafe_name", problem)
    return uri


def relative_key(uri: RemoteURI, base: RemoteURI) -> str | None:
    """`uri`'s key relative to the prefix `base`, or None when the object lies outside it."""
    if (uri.scheme, uri.bucket) != (base.scheme, base.bucket):
        return None
    if not base.key:
        return uri.key
    return uri.key[len(base.key) + 1:] if uri.key.startswith(base.key + "/") else None


@contextlib.contextmanager
def _open(uri: RemoteURI):
    """(stream, size) of an object, its size known before any byte of the body is requested."""
    fs = filesystem(uri.scheme)
    if uri.scheme == "s3":  # opening asks the object's metadata (one HEAD request)
        with fs.open_input_file(uri.fs_path) as stream:
            yield stream, stream.size()
        return
    import pyarrow.fs as pafs

    # GCS: metadata first, then a sequential stream (the random-access reader ranges every read)
    info = fs.get_file_info(uri.fs_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri.fs_path)
    if info.type != pafs.FileType.File:
        raise DecodeError("not_regular", "a prefix, not an object")
    with fs.open_input_stream(uri.fs_path) as stream:
        yield stream, int(info.size)


def read_object(path: str | bytes, max_bytes: int, root: str | bytes | None = None) -> bytes:
    """An object's bytes, or DecodeError(outside_root | unsafe_name | missing | permission | too_large |
    text | not_image | unreadable).

    The size is asked first (opening the object): one above `max_bytes` is refused before its body is
    requested; the first 64 KiB are checked as an image header (encoder.image.check_header) before the
    rest is read; at most max_bytes + 1 bytes are ever read.
    """
    uri = confine(path, root)
    try:
        with _open(uri) as (stream, size):
            if size > max_bytes:
                raise DecodeError("too_large", f"{size} bytes exceeds the {max_bytes}-byte limit")
            head = stream.read(min(1 << 16, max_bytes + 1))
            check_header(head)  # a large non-image object is refused before its body is read
            chunks, total = [head], len(head)
            while total <= max_bytes and (block := stream.read(min(1 << 24, max_bytes + 1 - total))):
                chunks.append(block)
                total += len(block)
            if total > max_bytes:  # replaced by a larger object since its size was asked
                raise DecodeError("too_large", f"more than {max_bytes} bytes (the limit)")
        return b"".join(chunks)
    except DecodeError:
        raise
    except PermissionError:
        raise DecodeError("permission", f"access denied{_where(uri)}") from None
    except FileNotFoundError:
        raise DecodeError("missing", "object disappeared before it could be read") from None
    except (OSError, ValueError) as exc:
        if any(code in str(exc) for code in ("ACCESS_DENIED", "AccessDenied", "PERMISSION_DENIED")):  # plain OSErrors
            raise DecodeError("permission", f"access denied{_where(uri)}: {_error_text(exc)}") from None
        raise DecodeError("unreadable", _error_text(exc)) from None
