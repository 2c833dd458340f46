"""The LipSim network and its Encoder (Ghazanfari et al., ICLR 2024, arXiv 2310.18274).

    x ∈ [0,1]^{3×S×S} → [normalise] → [space-to-depth by u] → zero-pad to C channels → conv_depth × SLLConv2d
      → pools × SumPool2d → flatten → linear_depth × SLLLinear → keep first D coordinates
      → f = [·, 1] (so ‖f‖ ≥ 1) → e = f/‖f‖.

Every stage is 1-Lipschitz (space-to-depth, `F.pixel_unshuffle`, only permutes coordinates: an isometry); with ‖f‖ ≥ 1 the normalisation equals the projection onto the unit
ball, which is 1-Lipschitz, so e is L-Lipschitz with L = 1 (or 1/min(std) when normalising).
The original code makes the constant coordinate optional and leaves it off; here it is always on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._sll_inference import can_use_fast_path, conv_trunk_inference, linear_inference
from .layers import PadChannels, SLLConv2d, SLLLinear, SumPool2d
from .presets import LipSimConfig
from .protocol import TorchEncoder

__all__ = ["LipSimNet", "LipSimEncoder"]


class LipSimNet(nn.Module):
    """The bare network: (B, 3, S, S) in [0,1] → unit-norm (B, D+1)."""

    def __init__(self, config: LipSimConfig):
        super().__init__()
        self.config = config
        if config.mean is not None:
            self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1))
        else:
            self.mean = self.std = None
        self.pad = PadChannels(config.channels)
        self.convs = nn.ModuleList(
            SLLConv2d(config.channels, config.conv_inner, config.kernel_size) for _ in range(config.conv_depth)
        )
        self.pool = SumPool2d(config.pool_size)
        self.linear = nn.ModuleList(
            SLLLinear(config.features, config.linear_inner) for _ in range(config.linear_depth)
        )

    def sll_layers(self) -> list[SLLConv2d | SLLLinear]:
        return [*self.convs, *self.linear]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) = [first D coordinates, 1] before normalisation, shape (B, D+1).

        Frozen, on the CPU and with no gradient wanted, the SLL layers run through the inference
        kernels of _sll_inference (the same formulas as their forward, ~4× faster on LipSim-small).
        """
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)
        fast = all(layer.frozen for layer in self.sll_layers()) and can_use_fast_path(x, self)
        if fast:
            x = conv_trunk_inference(x, self.convs)  # pads the channels itself
        else:
            x = self.pad(x)
            for layer in self.convs:
                x = layer(x)
        for _ in range(self.config.pools):
            x = self.pool(x)
        x = x.flatten(1)
        for layer in self.linear:
            x = linear_inference(x, layer) if fast else layer(x)
        x = x[:, : self.config.embed_dim]
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return f / f.norm(dim=1, keepdim=True)

    # Inference form -------------------------------------------------------------------------
    def freeze(self) -> "LipSimNet":
        """Eval mode, no parameter gradients, T⁻¹ folded into every layer (see layers.py)."""
        self.eval()
        self.requires_grad_(False)
        for layer in self.sll_layers():
            layer.freeze()
        return self

    def unfreeze(self) -> "LipSimNet":
        for layer in self.sll_layers():
            layer.unfreeze()
        self.requires_grad_(True)
        return self

    @property
    def frozen(self) -> bool:
        return any(layer.frozen for layer in self.sll_layers())

    def train(self, mode: bool = True) -> "LipSimNet":
        # Training changes weights, which would make a folded T⁻¹ stale.
        if mode and self.frozen:
            self.unfreeze()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        was_frozen = self.frozen
        self.unfreeze()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if was_frozen:
            self.freeze()
        return result


class LipSimEncoder(TorchEncoder):
    """Encoder-protocol wrapper around LipSimNet; `lipschitz` comes from the config (1 or 1/min std).

    `pretrained` states whether the weights were learned (loaded from a checkpoint, or trained in
    place) or are a fresh random initialisation (timing and tests only).
    """

    def __init__(self, config: LipSimConfig, name: str = "lipsim", metadata: dict | None = None,
                 pretrained: bool = False):
        super().__init__()
        self.pretrained = pretrained
        self.net = LipSimNet(config)
        self.config = config
        self.name = name
        self.dim = config.out_dim
        self.input_size = config.input_size
        self.lipschitz = config.lipschitz
        self.metadata = dict(metadata or {})

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def freeze(self) -> "LipSimEncoder":
        self.net.freeze()
        self.eval()
        return self

    def unfreeze(self) -> "LipSimEncoder":
        self.net.unfreeze()
        return self

    def info(self) -> dict:
        info = super().info()
        info["preset"] = self.metadata.get("preset")
        info["weights"] = self.metadata.get("weights", "unknown")
        return info
