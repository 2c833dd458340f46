"""robret checkpoints: safetensors tensors plus a JSON header (preset shape, provenance).

Header keys (all strings, as safetensors metadata requires):
    format      "robret-lipsim"      version   "1"
    config      LipSimConfig JSON    preset    preset name or "custom"
    provenance  JSON: training command, data, metrics, converter source, …
Loading is strict: every expected tensor present, nothing unexpected, shapes equal.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .lipsim import LipSimEncoder
from .presets import LipSimConfig
from .protocol import EncoderError

__all__ = ["CheckpointError", "save_lipsim", "load_lipsim", "read_header", "write_safetensors"]

FORMAT = "robret-lipsim"
VERSION = "1"


class CheckpointError(EncoderError):
    """A checkpoint file is missing, truncated, of the wrong format or of the wrong shape."""


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write tensors + string metadata atomically: temporary file in the same folder, then rename.

    A reader sees the old file or the new one, never a torn one. Permissions follow the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_lipsim(encoder: LipSimEncoder, path: str | os.PathLike, preset: str = "custom",
                provenance: dict | None = None) -> Path:
    """Write `encoder`'s weights atomically (temporary file, then rename) with its header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.net.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": encoder.config.to_json(),
        "preset": preset,
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    return write_safetensors(tensors, path, meta)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a robret checkpoint, with `config` and `provenance` decoded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a robret LipSim checkpoint (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this robret reads {VERSION}")
    try:
        meta["config"] = LipSimConfig.from_json(meta["config"])
        meta["provenance"] = json.loads(meta.get("provenance", "{}"))
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: corrupt robret header (config/provenance): {exc!r}") from exc
    return meta


def load_lipsim(path: str | os.PathLike, name: str | None = None, freeze: bool = True) -> LipSimEncoder:
    """Build the encoder a robret checkpoint describes and load its weights strictly."""
    path = Path(path)
    meta = read_header(path)
    enc = LipSimEncoder(
        meta["config"], name=name or f"lipsim:{path.stem}",
        metadata={"preset": meta.get("preset"), "weights": str(path), "provenance": meta["provenance"]},
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors (truncated or corrupt?): {exc}") from exc
    expected = enc.net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in bad[:5]]}"
        )
    enc.net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return enc.freeze() if freeze else enc
