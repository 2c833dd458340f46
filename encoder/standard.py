"""The standard (non-Lipschitz) CNN baseline: a small ResNet-style encoder, `standard:<name>`.

    x ∈ [0,1]^{3×S×S} → stride-2 stem conv → `stages` residual stages (stride 2, BatchNorm, ReLU)
      → global average pool → linear → e = z/‖z‖   (dim = embed_dim)
Nothing bounds its Lipschitz constant (`lipschitz = None`): it is the "non-robust" comparison when
DreamSim's weights are absent, and the teacher of the offline LipSim demo. It is trained
contrastively (SimCLR's NT-Xent, Chen et al. 2020) on two views of photo crops; see
`train_standard`.

Checkpoints: encoder.io's safetensors-with-header format (format "robret-standard", version, config,
provenance), like encoder.checkpoint's LipSim files. `standard:<name>` loads the bundled
encoder/weights/standard_<name>.safetensors; `standard:<path.safetensors>` loads any file.
`robdml:<name>` is the same network trained with robust metric learning (encoder.train.robdml):
encoder/weights/robdml_<name>.safetensors, or any file, in this format.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .io import CheckpointError, load_tensors, read_header, save_tensors
from .protocol import EncoderError, TorchEncoder
from .registry import bundled_weights, register_backend

__all__ = ["StandardConfig", "StandardNet", "StandardEncoder", "save_standard", "load_standard"]

FORMAT = "robret-standard"
VERSION = "1"


@dataclass(frozen=True)
class StandardConfig:
    """Shape of the baseline CNN; serialisable to JSON."""

    input_size: int = 64  # side of the square input in pixels
    widths: tuple[int, ...] = (24, 48, 96, 192)  # channels of each stride-2 residual stage
    embed_dim: int = 128  # output dimension (unit-norm)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StandardConfig":
        raw = json.loads(text)
        raw["widths"] = tuple(raw["widths"])
        return cls(**raw)


class _Block(nn.Module):
    """Basic residual block (two 3×3 convs), stride 2, with a 1×1 projection on the skip path."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class StandardNet(nn.Module):
    """(B, 3, S, S) in [0,1] → un-normalised (B, embed_dim)."""

    def __init__(self, config: StandardConfig):
        super().__init__()
        self.config = config
        w0 = config.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        chans = [w0, *config.widths]
        self.stages = nn.Sequential(*(_Block(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.head = nn.Linear(config.widths[-1], config.embed_dim)

    def forward(self, x):
        # Inputs are centred around 0.5 so that the stem sees zero-mean data.
        h = self.stages(self.stem(x - 0.5))
        return self.head(h.mean((2, 3)))


class StandardEncoder(TorchEncoder):
    """Encoder-protocol wrapper: unit-norm embeddings, no Lipschitz guarantee (`lipschitz = None`)."""

    def __init__(self, config: StandardConfig = StandardConfig(), name: str = "standard", metadata=None,
                 pretrained: bool = False):
        super().__init__()
        self.pretrained = pretrained  # learned weights (loaded or trained), not a random initialisation
        self.net = StandardNet(config)
        self.config = config
        self.name = name
        self.dim = config.embed_dim
        self.input_size = config.input_size
        self.lipschitz = None
        self.metadata = dict(metadata or {})

    def _embed(self, x):
        z = self.net(x)
        return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def freeze(self) -> "StandardEncoder":
        self.eval()
        self.requires_grad_(False)
        return self

    def info(self) -> dict:
        info = super().info()
        info["weights"] = self.metadata.get("weights", "unknown")
        return info


def save_standard(encoder: StandardEncoder, path: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write weights (safetensors, BatchNorm buffers included) and the JSON header atomically."""
    return save_tensors(path, encoder.net.state_dict(), FORMAT, VERSION, encoder.config.to_json(),
                        provenance=provenance or {})


def read_standard_header(path: str | os.PathLike) -> dict:
    """The header of a standard-CNN checkpoint, with `config` and `provenance` decoded."""
    return read_header(path, FORMAT, VERSION, "standard-CNN checkpoint", config=StandardConfig.from_json,
                       json_fields=("provenance",))


def load_standard(path: str | os.PathLike, name: str | None = None, freeze: bool = True) -> StandardEncoder:
    """Build the baseline a checkpoint describes and load its tensors strictly."""
    path = Path(path)
    meta = read_standard_header(path)
    enc = StandardEncoder(meta["config"], name=name or f"standard:{path.stem}", pretrained=True,
                          metadata={"weights": str(path), "provenance": meta["provenance"]})
    try:
        enc.net.load_state_dict(load_tensors(path), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its config: {exc}") from exc
    return enc.freeze() if freeze else enc


def _bundled_or_file(prefix: str, arg: str) -> StandardEncoder:
    bundled = bundled_weights(prefix)
    if arg in bundled:
        return load_standard(bundled[arg], name=f"{prefix}:{arg}")
    path = Path(arg).expanduser()
    if path.suffix == ".safetensors" and path.exists():
        return load_standard(path, name=f"{prefix}:{path.stem}")
    if path.exists():
        raise EncoderError(f"{path}: not a standard-CNN .safetensors checkpoint")
    train = "robret train robdml --demo" if prefix == "robdml" else "robret train demo"
    raise ValueError(f"unknown {prefix} checkpoint {arg!r}: not bundled ({', '.join(bundled) or 'none installed'}) "
                     f"nor an existing .safetensors file (train one with `{train}`)")


@register_backend("standard")  # its specs: registry._builtin_listers
def _load_backend(arg: str, **_) -> StandardEncoder:
    """`standard:<bundled name | .safetensors path>` (encoder.registry)."""
    return _bundled_or_file("standard", arg)


@register_backend("robdml")  # its specs: registry._builtin_listers
def _load_robdml(arg: str, **_) -> StandardEncoder:
    """`robdml:<bundled name | .safetensors path>`: the same CNN adversarially trained for metric learning
    (HM[S, g_LGA] + ICS, encoder.train.robdml); `robdml:demo` is encoder/weights/robdml_demo.safetensors."""
    return _bundled_or_file("robdml", arg)
