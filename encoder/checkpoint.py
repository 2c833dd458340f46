"""robret LipSim checkpoints (the safetensors-with-header format of encoder.io) and the `lipsim:` backend.

Header keys (all strings, as safetensors metadata requires):
    format      "robret-lipsim"      version   "1"
    config      LipSimConfig JSON    preset    preset name or "custom"
    provenance  JSON: training command, data, metrics, converter source, …
Loading is strict: every expected tensor present, nothing unexpected, shapes equal.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .convert import load_official
from .checkpoint_header import FORMAT, VERSION, read_header
from .io import CheckpointError, load_tensors, save_tensors
from .lipsim import LipSimEncoder
from .presets import PRESETS, LipSimConfig
from .pretrained import LIPSIM_OFFICIAL, lipsim_official_path, weights_root
from .protocol import EncoderError
from .registry import bundled_weights, register_backend

__all__ = ["CheckpointError", "save_lipsim", "load_lipsim", "read_header"]



def save_lipsim(encoder: LipSimEncoder, path: str | os.PathLike, preset: str = "custom",
                provenance: dict | None = None) -> Path:
    """Write `encoder`'s weights atomically (encoder.io.atomic_write) with its header."""
    return save_tensors(path, encoder.net.state_dict(), FORMAT, VERSION, encoder.config.to_json(), preset=preset,
                        provenance=provenance or {})


def load_lipsim(path: str | os.PathLike, name: str | None = None, freeze: bool = True) -> LipSimEncoder:
    """Build the encoder a robret checkpoint describes and load its weights strictly."""
    path = Path(path)
    meta = read_header(path)
    enc = LipSimEncoder(
        meta["config"], name=name or f"lipsim:{path.stem}", pretrained=True,
        metadata={"preset": meta.get("preset"), "weights": str(path), "provenance": meta["provenance"]},
    )
    state = load_tensors(path)
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


def _load_official_tag(tag: str, weights_dir: str | os.PathLike | None) -> LipSimEncoder:
    """`lipsim:official-*` from the weights cache, where `robret weights fetch` put it (never downloads)."""
    path = lipsim_official_path(tag, weights_dir)
    if not path.is_file():
        where = f" --cache-dir {weights_root(weights_dir)[0]}" if weights_dir else ""
        raise EncoderError(f"'lipsim:{tag}' is not in the weights cache ({path} is missing); fetch it with: "
                           f"robret weights fetch lipsim:{tag}{where}")
    return load_lipsim(path, name=f"lipsim:{tag}")


@register_backend("lipsim")  # its specs: registry._builtin_listers
def _load_backend(arg: str, seed: int = 0, weights_dir: str | os.PathLike | None = None, **_) -> LipSimEncoder:
    """`lipsim:<bundled name | official-* | preset | .safetensors path | official .pth path>` (encoder.registry).

    `official-*` checkpoints are read from the weights cache (`weights_dir`, else encoder.pretrained's root).
    """
    bundled = bundled_weights("lipsim")
    if arg in bundled:
        return load_lipsim(bundled[arg], name=f"lipsim:{arg}")
    if arg in LIPSIM_OFFICIAL:
        return _load_official_tag(arg, weights_dir)
    if arg in PRESETS:
        with torch.random.fork_rng(devices=[]):  # seeded weights without resetting the caller's RNG
            torch.manual_seed(seed)
            enc = LipSimEncoder(PRESETS[arg], name=f"lipsim:{arg} (random weights)", pretrained=False,
                                metadata={"preset": arg, "weights": f"random (seed {seed})"})
        return enc.freeze()
    path = Path(arg).expanduser()
    if path.suffix == ".safetensors":
        return load_lipsim(path)
    if path.suffix in (".pth", ".pt", ".tar", ".ckpt"):
        return load_official(path)
    if arg and path.exists():
        raise EncoderError(f"{path}: unknown checkpoint type (expected .safetensors, or an official .pth)")
    raise ValueError(
        f"unknown LipSim checkpoint {arg!r}: not a bundled model ({', '.join(bundled) or 'none installed'}), "
        f"an official checkpoint ({', '.join(LIPSIM_OFFICIAL)}), "
        f"a preset ({', '.join(PRESETS)}), or an existing file"
    )
