"""Converter for the official LipSim checkpoints (github.com/SaraGhazanfari/lipsim) — never unpickled as code.

Official files are `torch.save` dicts with `model_state_dict`; the network sat inside
NormalizedModel(…).model and DistributedDataParallel(…).module, hence the `module.model.` prefix:
    convs.{i}.kernel [5, C, 3, 3]   convs.{i}.bias [1, 5, 1, 1]   convs.{i}.q [5]
    linear.{j}.weight [n, F]        linear.{j}.bias [1, n]          linear.{j}.q [n]
with the same tensors repeated under `base.1.` (= convs) and `base.2.` (= linear): the official
module registers them twice. In `linear`, index 0 is a Flatten, so dense indices start at 1.

One quirk is converted faithfully: the official SLL *conv* layer computes
t = Σ exp(−q)·|KKᵀ|·exp(q) with both factors reshaped along the same axis, so q cancels and
acts as q = 0. We zero the converted conv `q` to reproduce that function exactly (any q gives a
sound layer). The official dense layer uses q correctly and is copied as is.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from .io import CheckpointError
from .lipsim import LipSimEncoder
from .presets import PRESETS, LipSimConfig

__all__ = ["is_official_state_dict", "convert_official_state_dict", "load_official"]

_PREFIXES = ("module.model.", "module.", "model.")
_CONV = re.compile(r"^convs\.(\d+)\.(kernel|bias|q)$")
_LIN = re.compile(r"^linear\.(\d+)\.(weight|bias|q)$")
_DUP = re.compile(r"^base\.(1|2)\.(\d+)\.(kernel|weight|bias|q)$")


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def is_official_state_dict(state: dict) -> bool:
    """Telltale: a `convs.N.kernel` key under one of the official prefixes."""
    return any(_CONV.match(_strip(k)) and k.endswith("kernel") for k in state)


def convert_official_state_dict(state: dict, embed_dim: int = 1792,
                                mean=None, std=None) -> tuple[LipSimConfig, dict]:
    """Official `model_state_dict` → (LipSimConfig, robret LipSimNet state dict). Pure function.

    The input size follows from the shapes: F = C·(S/16)². `embed_dim` (D) is not stored in the
    official file (its truncation has no weights): 1792 for the DreamSim-ensemble-distilled models.
    `mean`/`std`: the normalisation the checkpoint was trained with, if any (it multiplies L).
    """
    convs: dict[int, dict] = {}
    lins: dict[int, dict] = {}
    dups: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        k = _strip(key)
        if "alpha" in k:
            continue  # dropped by the official loader too (lipsim/core/evaluate.py, load_ckpt)
        if m := _CONV.match(k):
            convs.setdefault(int(m[1]), {})[m[2]] = value
        elif m := _LIN.match(k):
            lins.setdefault(int(m[1]), {})[m[2]] = value
        elif _DUP.match(k):
            dups[k] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"unexpected keys in official LipSim state dict: {unexpected[:8]}")
    if not convs or not lins:
        raise CheckpointError("official LipSim state dict needs convs.* and linear.* tensors")
    # The duplicated base.* copies must agree with the primary ones.
    conv_order, lin_order = sorted(convs), sorted(lins)
    for k, v in dups.items():
        _, part, idx, name = k.split(".")
        if part == "1":
            src = convs.get(int(idx), {}).get(name)
        else:
            src = lins.get(int(idx), {}).get(name)
        if src is None or src.shape != v.shape or not torch.equal(src, v):
            raise CheckpointError(f"duplicated tensor {k} does not match its primary copy")
    for group, names in ((convs, ("kernel", "bias", "q")), (lins, ("weight", "bias", "q"))):
        for idx, params in group.items():
            if set(params) != set(names):
                raise CheckpointError(f"layer {idx} has tensors {sorted(params)}, expected {list(names)}")
    inner, channels, ks, _ = convs[conv_order[0]]["kernel"].shape
    lin_inner, features = lins[lin_order[0]]["weight"].shape
    shapes = {"kernel": (inner, channels, ks, ks), "weight": (lin_inner, features)}
    for idx, params in [*convs.items(), *lins.items()]:
        name = "kernel" if "kernel" in params else "weight"
        if tuple(params[name].shape) != shapes[name]:
            raise CheckpointError(f"layer {idx}: {name} shape {tuple(params[name].shape)}, expected {shapes[name]}")
    side = math.isqrt(features // channels)
    if side * side * channels != features:
        raise CheckpointError(f"dense width {features} is not C·s² for C={channels}")
    try:
        config = LipSimConfig(
            input_size=side * 16, channels=channels, conv_depth=len(convs), conv_inner=inner,
            linear_depth=len(lins), linear_inner=lin_inner, embed_dim=embed_dim, kernel_size=ks,
            mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        )
    except ValueError as exc:
        raise CheckpointError(f"official LipSim state dict has an unsupported shape: {exc}") from exc
    out = {}
    for new, idx in enumerate(conv_order):
        p = convs[idx]
        out[f"convs.{new}.kernel"] = p["kernel"].float()
        out[f"convs.{new}.bias"] = p["bias"].float().reshape(1, inner, 1, 1)
        out[f"convs.{new}.q"] = torch.zeros(inner)  # the official conv layer's q cancels (module doc)
    for new, idx in enumerate(lin_order):
        p = lins[idx]
        out[f"linear.{new}.weight"] = p["weight"].float()
        out[f"linear.{new}.bias"] = p["bias"].float().reshape(1, lin_inner)
        out[f"linear.{new}.q"] = p["q"].float()
    if mean is not None:
        out["mean"] = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        out["std"] = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return config, out


def load_official(path: str | os.PathLike, embed_dim: int = 1792, mean=None, std=None,
                  freeze: bool = True) -> LipSimEncoder:
    """Load an official LipSim `.pth` with `torch.load(weights_only=True)` and convert it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt/unsafe files
        raise CheckpointError(
            f"{path} is not a loadable PyTorch checkpoint (truncated, corrupt, or contains code "
            f"objects that weights_only loading refuses): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(raw).__name__}")
    state = raw.get("model_state_dict", raw)
    if not isinstance(state, dict) or not is_official_state_dict(state):
        raise CheckpointError(
            f"{path} is not an official LipSim checkpoint: no 'model_state_dict' with "
            f"'module.model.convs.N.kernel' keys (top-level keys: {sorted(raw)[:8]})"
        )
    config, converted = convert_official_state_dict(state, embed_dim=embed_dim, mean=mean, std=std)
    preset = next((name for name, c in PRESETS.items() if c == config), "custom")
    enc = LipSimEncoder(config, name=f"lipsim:{path.stem}", pretrained=True,
                        metadata={"preset": preset, "weights": f"{path} (official, converted)"})
    try:
        enc.net.load_state_dict(converted)
    except RuntimeError as exc:  # layers of unequal shapes
        raise CheckpointError(f"{path}: official LipSim tensors do not fit one network shape: {exc}") from exc
    return enc.freeze() if freeze else enc
