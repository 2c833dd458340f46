"""Spec strings → encoders, like timm's `create_model`: `load_encoder("lipsim:demo")`.

    lipsim:<name>        a bundled checkpoint (encoder/weights/lipsim_<name>.safetensors)
    lipsim:official-*    an official checkpoint from the weights cache (`robret weights fetch`; encoder.pretrained)
    lipsim:<preset>      a preset shape with random weights (`pretrained` False: timing and tests only)
    lipsim:<path>        a robret .safetensors checkpoint, or an official LipSim .pth (converted)
    standard:<name|path> the standard CNN baseline (encoder.standard)
    dreamsim:<variant>   DreamSim (encoder.dreamsim_backend)
    pixels[:<size>]      raw pixels (1-Lipschitz baseline)
Each backend registers its prefix with the `register_backend` decorator next to its definition
(timm's `@register_model`). The built-in backends (lipsim, dreamsim, pixels, standard) are imported on the
first `load_encoder`; the specs they know are data (bundled files, presets, official tags, DreamSim
variants), listed by `list_encoders` without importing torch or any model code (`robret encoder list`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from .protocol import TorchEncoder

__all__ = ["load_encoder", "list_encoders", "register_backend", "load_metric", "bundled_weights",
           "DEFAULT_ENCODER"]

DEFAULT_ENCODER = "lipsim:demo"
WEIGHTS_DIR = Path(__file__).parent / "weights"

_BACKENDS: dict[str, Callable[..., TorchEncoder]] = {}
_LISTERS: dict[str, Callable[[], list[str]]] = {}


def register_backend(prefix: str, lister: Callable[[], list[str]] | None = None):
    """Decorator: make `prefix:<arg>` specs load through the decorated `factory(arg, **kwargs)`.

    `lister()` names the args this installation knows (for `list_encoders`); without it the
    backend is listed as the bare prefix.
    """
    def decorate(factory: Callable[..., TorchEncoder]) -> Callable[..., TorchEncoder]:
        _BACKENDS[prefix] = factory
        if lister is not None:
            _LISTERS[prefix] = lister
        return factory

    return decorate


def bundled_weights(prefix: str = "lipsim") -> dict[str, Path]:
    """Bundled checkpoints shipped in encoder/weights, e.g. {'demo': .../lipsim_demo.safetensors}."""
    found = {}
    for p in sorted(WEIGHTS_DIR.glob(f"{prefix}_*.safetensors")):
        found[p.stem[len(prefix) + 1:]] = p
    return found


def _builtin_listers() -> dict[str, Callable[[], list[str]]]:
    """The specs each built-in backend knows, from data modules that do not import torch."""
    from .dreamsim_files import VARIANTS
    from .presets import PRESETS
    from .pretrained import LIPSIM_OFFICIAL

    return {"lipsim": lambda: [*bundled_weights("lipsim"), *LIPSIM_OFFICIAL, *PRESETS],
            "dreamsim": lambda: list(VARIANTS), "pixels": lambda: ["", "64"],
            "standard": lambda: list(bundled_weights("standard")), "robdml": lambda: list(bundled_weights("robdml"))}


def _import_builtin_backends() -> None:
    """Import the built-in backend modules: their `register_backend` decorators register the factories."""
    from . import checkpoint, dreamsim_backend, pixels, standard  # noqa: F401


def list_encoders() -> list[str]:
    """Every spec this installation knows (bundled checkpoints, presets, variants)."""
    listers = {**_builtin_listers(), **_LISTERS}
    specs = []
    for prefix in dict.fromkeys([*_builtin_listers(), *_BACKENDS]):
        for arg in listers.get(prefix, lambda: [""])():
            specs.append(f"{prefix}:{arg}" if arg else prefix)
    return specs


def load_encoder(spec: str = DEFAULT_ENCODER, device: str | torch.device = "cpu", **kwargs) -> TorchEncoder:
    """Build the encoder named by `spec` (see module doc) on `device`, in inference mode."""
    prefix, _, arg = spec.partition(":")
    _import_builtin_backends()
    if prefix not in _BACKENDS:
        raise ValueError(f"unknown encoder {spec!r}; known backends: {', '.join(_BACKENDS)} "
                         f"(try one of: {', '.join(list_encoders())})")
    enc = _BACKENDS[prefix](arg, **kwargs)
    return enc.to(device).eval()


def load_metric(spec: str = DEFAULT_ENCODER, device: str | torch.device = "cpu", **kwargs):
    """dreamsim-style: `model, preprocess = load_metric("lipsim:demo")`; `model(a, b)` is a distance."""
    enc = load_encoder(spec, device=device, **kwargs)
    return enc, enc.preprocess
