"""Spec strings → encoders, like timm's `create_model`: `load_encoder("lipsim:demo")`.

    lipsim:<name>        a bundled checkpoint (encoder/weights/lipsim_<name>.safetensors)
    lipsim:<preset>      a preset shape with random weights (labelled so: timing and tests only)
    lipsim:<path>        a robret .safetensors checkpoint, or an official LipSim .pth (converted)
    pixels[:<size>]      raw pixels (1-Lipschitz baseline)
Other packages register more prefixes (`dreamsim:`, `standard:`) with `register_backend`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .protocol import EncoderError, TorchEncoder

__all__ = ["load_encoder", "list_encoders", "register_backend", "load_metric", "bundled_weights",
           "DEFAULT_ENCODER"]

DEFAULT_ENCODER = "lipsim:demo"
WEIGHTS_DIR = Path(__file__).parent / "weights"

_BACKENDS: dict[str, Callable[..., TorchEncoder]] = {}
_LISTERS: dict[str, Callable[[], list[str]]] = {}


def register_backend(prefix: str, factory: Callable[..., TorchEncoder],
                     lister: Callable[[], list[str]] | None = None) -> None:
    """Make `prefix:<arg>` specs load through `factory(arg, **kwargs)`; `lister` names known args."""
    _BACKENDS[prefix] = factory
    if lister is not None:
        _LISTERS[prefix] = lister


def bundled_weights(prefix: str = "lipsim") -> dict[str, Path]:
    """Bundled checkpoints shipped in encoder/weights, e.g. {'demo': .../lipsim_demo.safetensors}."""
    found = {}
    for p in sorted(WEIGHTS_DIR.glob(f"{prefix}_*.safetensors")):
        found[p.stem[len(prefix) + 1:]] = p
    return found


def _load_lipsim(arg: str, seed: int = 0, **_) -> TorchEncoder:
    from .checkpoint import load_lipsim
    from .convert import load_official
    from .lipsim import LipSimEncoder
    from .presets import PRESETS

    bundled = bundled_weights("lipsim")
    if arg in bundled:
        return load_lipsim(bundled[arg], name=f"lipsim:{arg}")
    if arg in PRESETS:
        with torch.random.fork_rng(devices=[]):  # seeded weights without resetting the caller's RNG
            torch.manual_seed(seed)
            enc = LipSimEncoder(PRESETS[arg], name=f"lipsim:{arg} (random weights)",
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
        f"a preset ({', '.join(PRESETS)}), or an existing file"
    )


def _list_lipsim() -> list[str]:
    from .presets import PRESETS

    return [*bundled_weights("lipsim"), *PRESETS]


def _load_pixels(arg: str, **_) -> TorchEncoder:
    from .pixels import PixelsEncoder

    return PixelsEncoder(int(arg) if arg else 32)


register_backend("lipsim", _load_lipsim, _list_lipsim)
register_backend("pixels", _load_pixels, lambda: ["", "64"])


def _ensure_optional_backends() -> None:
    """Import the modules that register further prefixes (kept lazy: nothing heavy at import)."""
    import importlib

    for mod in ("encoder.dreamsim_backend", "encoder.standard"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def list_encoders() -> list[str]:
    """Every spec this installation knows (bundled checkpoints, presets, variants)."""
    _ensure_optional_backends()
    specs = []
    for prefix in _BACKENDS:
        for arg in _LISTERS.get(prefix, lambda: [""])():
            specs.append(f"{prefix}:{arg}" if arg else prefix)
    return specs


def load_encoder(spec: str = DEFAULT_ENCODER, device: str | torch.device = "cpu", **kwargs) -> TorchEncoder:
    """Build the encoder named by `spec` (see module doc) on `device`, in inference mode."""
    _ensure_optional_backends()
    prefix, _, arg = spec.partition(":")
    if prefix not in _BACKENDS:
        raise ValueError(f"unknown encoder {spec!r}; known backends: {', '.join(_BACKENDS)} "
                         f"(try one of: {', '.join(list_encoders())})")
    enc = _BACKENDS[prefix](arg, **kwargs)
    return enc.to(device).eval()


def load_metric(spec: str = DEFAULT_ENCODER, device: str | torch.device = "cpu", **kwargs):
    """dreamsim-style: `model, preprocess = load_metric("lipsim:demo")`; `model(a, b)` is a distance."""
    enc = load_encoder(spec, device=device, **kwargs)
    return enc, enc.preprocess
