"""Files robret writes: one atomic, durable writer and one safetensors-with-header format.

Atomic writer (`atomic_write`): the content goes to a temporary file in the destination's folder,
which is flushed and fsynced, then renamed over the destination, and the folder is fsynced. A reader
sees the old file or the new one, never a torn one, and after a crash the rename is either durable
or absent. Every file robret replaces in place goes through it (checkpoints, training states,
embedding caches, FAISS indexes, index configurations).

Tensor files (`save_tensors` / `read_header` / `load_tensors`): safetensors tensors plus string
metadata (safetensors allows nothing else), with these keys:
    format    what the file is, e.g. "robret-lipsim", "robret-standard", "robret-teacher-embeddings"
    version   the format's version, a string ("1")
    config    JSON: what is needed to rebuild the object the tensors belong to
    …         further keys per format (e.g. provenance: JSON)
No pickle anywhere: safetensors holds only named arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    import torch

from .errors import EncoderError

__all__ = ["CheckpointError", "atomic_write", "atomic_write_text", "fsync_dir", "file_sha256", "fd_sha256", "save_tensors",
           "read_header", "load_tensors"]


class CheckpointError(EncoderError):
    """A tensor file is missing, truncated, of the wrong format, version or shape."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex of a file's content."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return fd_sha256(fd, chunk)
    finally:
        os.close(fd)


def fd_sha256(fd: int, chunk: int = 1 << 22) -> str:
    """SHA-256 hex of an open file's whole content, read from its start (positional reads: the
    descriptor's offset is left alone, so the same descriptor can then be loaded)."""
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, chunk, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, fill: Callable[[Path], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Replace `path` atomically and durably by what `fill(tmp)` writes to the temporary path `tmp`.

    `tmp` is `<path name>.<random>.tmp` in the same folder (a rename never crosses file systems).
    `before_replace(tmp)` runs once `tmp` is durable, just before the rename (a hook for crash
    tests and checksums). The temporary file is removed if anything fails before the rename.
    Permissions follow the umask, as for any ordinary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _metadata_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], format: str, version: str,
                 config: Any, **fields: Any) -> Path:
    """Write `tensors` (moved to the CPU, made contiguous) with the header {format, version, config,
    **fields} atomically. `config` and the fields are stored as given when strings, else as JSON."""
    from safetensors.torch import save_file  # imports torch: only writers of tensors pay for it

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": format, "version": version, "config": _metadata_value(config),
            **{k: _metadata_value(v) for k, v in fields.items()}}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_header(path: str | os.PathLike, format: str, version: str, kind: str,
                config: Callable[[str], Any] = json.loads, json_fields: tuple[str, ...] = (),
                upgrade: Callable[[dict], dict] | None = None) -> dict:
    """The header of a robret tensor file, checked and decoded.

    Raises CheckpointError unless the file is a readable safetensors file whose `format` and
    `version` are the ones given (`kind` names the format in messages). `config` parses the config
    string (JSON by default); the keys in `json_fields` are decoded as JSON (absent: {}).
    `upgrade(raw)` may first rewrite the header of an older layout into the current one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if upgrade is not None:
        meta = upgrade(meta)
    if meta.get("format") != format:
        raise CheckpointError(f"{path} is not a robret {kind} (format={meta.get('format')!r})")
    if meta.get("version") != version:
        raise CheckpointError(f"{path} has {kind} version {meta.get('version')!r}; this robret reads {version}")
    try:
        meta["config"] = config(meta["config"])
        for key in json_fields:
            meta[key] = json.loads(meta.get(key, "{}"))
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: corrupt robret header ({', '.join(('config', *json_fields))}): "
                              f"{exc!r}") from exc
    return meta


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; CheckpointError if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors (truncated or corrupt?): {exc}") from exc
