"""LipSim architecture presets: shapes only, never weights (a checkpoint names the preset it needs).

Official shapes (LipSim, Ghazanfari et al., ICLR 2024): conv inner dimension 5, input 224,
two 4×4 sum-pools (224 → 14), D = 1792 kept coordinates (the DreamSim ensemble's width).
The `cpu-*` presets are ours: 64–128 px inputs for training and serving on a laptop-class CPU.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

__all__ = ["LipSimConfig", "PRESETS", "get_preset", "list_presets"]


@dataclass(frozen=True)
class LipSimConfig:
    """Shape of a LipSim network; serialisable to JSON (`to_json` / `from_json`)."""

    input_size: int  # side of the square input in pixels (a multiple of unshuffle·pool_size**pools)
    channels: int  # width C of the convolutional trunk (the 3 RGB channels are zero-padded to C)
    conv_depth: int  # number of SLL conv layers at full resolution
    conv_inner: int  # inner dimension of each SLL conv layer (rows of its kernel)
    linear_depth: int  # number of SLL dense layers after flattening
    linear_inner: int  # inner dimension of each SLL dense layer
    embed_dim: int  # D: coordinates kept after the dense layers; a constant 1 is appended after them
    pools: int = 2  # number of sum-pools between the conv trunk and the dense layers
    pool_size: int = 4  # side of each sum-pool window
    kernel_size: int = 3  # conv kernel side
    mean: tuple[float, float, float] | None = None  # per-channel normalisation mean (None: none)
    std: tuple[float, float, float] | None = None  # per-channel normalisation std; multiplies L by 1/min(std)
    # u: space-to-depth before the trunk (pixel_unshuffle: each u×u block of a channel becomes u² channels
    # at 1/u the side). A permutation of coordinates, so ‖·‖₂ is preserved exactly and L is unchanged;
    # the trunk then runs on (input_size/u)² positions with 3u² ≤ channels inputs. 1 = none (the paper).
    unshuffle: int = 1

    def __post_init__(self) -> None:
        step = self.unshuffle * self.pool_size**self.pools
        side = self.input_size // step
        if self.unshuffle < 1 or side < 1 or side * step != self.input_size:
            raise ValueError(
                f"input_size {self.input_size} must be a positive multiple of "
                f"unshuffle·pool_size**pools = {step}"
            )
        if 3 * self.unshuffle**2 > self.channels:
            raise ValueError(f"unshuffle {self.unshuffle} gives {3 * self.unshuffle ** 2} input channels, more "
                             f"than the trunk's {self.channels}")
        if self.embed_dim > self.features:
            raise ValueError(f"embed_dim {self.embed_dim} exceeds the {self.features} flattened features")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std must be positive")

    @property
    def features(self) -> int:
        """Width of the dense part: C·(input_size / (unshuffle·pool_size**pools))²."""
        return self.channels * (self.input_size // (self.unshuffle * self.pool_size**self.pools)) ** 2

    @property
    def out_dim(self) -> int:
        """Dimension of the unit-norm embedding: D kept coordinates plus the constant one."""
        return self.embed_dim + 1

    @property
    def lipschitz(self) -> float:
        """ℓ2 Lipschitz bound of the embedding w.r.t. [0,1] pixels: 1, or 1/min(std) when normalising."""
        return 1.0 if self.std is None else 1.0 / min(self.std)

    def num_params(self) -> int:
        k2 = self.kernel_size**2
        conv = self.conv_depth * (self.conv_inner * self.channels * k2 + 2 * self.conv_inner)
        dense = self.linear_depth * (self.linear_inner * self.features + 2 * self.linear_inner)
        return conv + dense

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LipSimConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown LipSimConfig fields {sorted(unknown)}")
        for key in ("mean", "std"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)


_OFFICIAL = dict(input_size=224, conv_inner=5, embed_dim=1792)

PRESETS: dict[str, LipSimConfig] = {
    # Official shapes (accept official checkpoints through encoder.convert).
    "small": LipSimConfig(channels=45, conv_depth=20, linear_depth=7, linear_inner=1024, **_OFFICIAL),
    "medium": LipSimConfig(channels=60, conv_depth=30, linear_depth=10, linear_inner=2048, **_OFFICIAL),
    "large": LipSimConfig(channels=90, conv_depth=50, linear_depth=10, linear_inner=2048, **_OFFICIAL),
    "xlarge": LipSimConfig(channels=120, conv_depth=70, linear_depth=15, linear_inner=2048, **_OFFICIAL),
    # Ours, for CPUs. cpu-tiny exists for tests. The bundled lipsim:demo is none of these: its
    # checkpoint header holds a custom shape (encoder.train.demo.DEMO_LIPSIM: 128 px, space-to-depth
    # by 2, 6 conv layers of 24 channels with inner 12, three 2×2 sum-pools, 3 dense layers of 512, D = 128). The conv trunk runs at full
    # resolution, so its cost grows with pixels × channels × depth: cpu-base (96 px) and cpu-large
    # (128 px) keep it thin (6 layers, inner 8) to still train at tens of images/s on two cores
    # (measured against cpu-small in docs/benchmarks/lipsim.md).
    "cpu-tiny": LipSimConfig(
        input_size=32, channels=8, conv_depth=3, conv_inner=8, linear_depth=2, linear_inner=64, embed_dim=32
    ),
    "cpu-small": LipSimConfig(
        input_size=64, channels=24, conv_depth=8, conv_inner=16, linear_depth=3, linear_inner=512, embed_dim=128
    ),
    "cpu-base": LipSimConfig(
        input_size=96, channels=24, conv_depth=6, conv_inner=8, linear_depth=3, linear_inner=1024, embed_dim=256
    ),
    "cpu-large": LipSimConfig(
        input_size=128, channels=16, conv_depth=6, conv_inner=8, linear_depth=3, linear_inner=1024, embed_dim=512
    ),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> LipSimConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown LipSim preset {name!r}; known presets: {', '.join(PRESETS)}") from None
