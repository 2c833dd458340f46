"""`dreamsim:<variant>` encoders: DreamSim (Fu et al., NeurIPS 2023, arXiv 2306.09344) through the
`dreamsim` package's own loader, `dreamsim.dreamsim()`, never a re-implementation.

    load_encoder("dreamsim:ensemble", cache_dir="~/dreamsim-weights")

Variants: ensemble (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16, 1792-d), dino_vitb16,
dinov2_vitb14, synclr_vitb16 (768-d), clip_vitb32, open_clip_vitb32 (512-d), and the patch models
dino_vitb16_patch, dinov2_vitb14_patch (`use_patch_model`: CLS token and mean patch token, 1536-d).

Weights come from a cache directory, chosen in this order:
  1. the `cache_dir=` argument (`robret … --cache-dir DIR`),
  2. the environment variable ROBRET_DREAMSIM_CACHE,
  3. <weights cache root>/dreamsim (encoder.pretrained.weights_root: $ROBRET_WEIGHTS_DIR, else the
     user cache directory, ~/.cache/robret on Linux), where `robret weights fetch` installs them.
Loading never downloads: when a file dreamsim would read is missing, loading stops with an
EncoderError naming the variant, the files expected and the `robret weights fetch` command that
installs them (encoder.fetch; dreamsim's own code path would download them: it is only called once
every file it reads is present). The release files each variant needs are read from dreamsim.model. The DINO
variants also need the torch.hub copy of their backbone in that directory (dreamsim points torch.hub
there); for the DINOv2 variants torch.hub still asks github.com for the repository's default branch
name before using its cached copy (no download; offline, the request fails and the cache is used).

Embedding: dreamsim's `embed` with normalize_embeds=True (features centred, unit norm), so
1 − ⟨e(x), e(y)⟩ equals dreamsim's `model(x, y)`; for patch models [CLS, mean patch] renormalised,
as dreamsim's forward compares them. Inputs are [0,1] images at 224 px: dreamsim normalises
(ImageNet or CLIP mean/std) inside the model. Preprocessing is the protocol's float bilinear resize;
dreamsim's own preprocess is a bicubic PIL resize to 224 + ToTensor (close, not identical).
No Lipschitz bound: `lipschitz = None`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .dreamsim_files import (ENV_CACHE, VARIANTS, _missing_message, _variant, expected_files, fetch_command,
                             missing_files, resolve_cache_dir)
from .protocol import EncoderError, TorchEncoder
from .registry import register_backend

__all__ = ["VARIANTS", "DreamSimEncoder", "load_dreamsim", "resolve_cache_dir", "expected_files",
           "missing_files", "fetch_command", "ENV_CACHE"]

log = logging.getLogger(__name__)


def _patch_embedding(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1+P, D) patch-model tokens → unit (B, 2D): [CLS, mean patch], as dreamsim's forward compares them."""
    return F.normalize(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1), dim=-1)


class DreamSimEncoder(TorchEncoder):
    """A dreamsim PerceptualModel (with its LoRA adapter, a peft PeftModel) behind the Encoder protocol."""

    input_size = 224
    lipschitz = None
    pretrained = True  # DreamSim's released weights

    def __init__(self, model: torch.nn.Module, variant: str, cache_dir: Path):
        super().__init__()
        self.model = model
        self.variant = variant
        self.name = f"dreamsim:{variant}"
        self.dim = VARIANTS[variant].dim
        self.cache_dir = cache_dir
        self._patch = VARIANTS[variant].patch

    def perceptual_model(self):
        """The dreamsim.PerceptualModel inside the peft wrapper."""
        return self.model.get_base_model()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        e = self.model.embed(x)  # centred, unit norm (per token for patch models)
        return _patch_embedding(e) if self._patch else e

    def _apply(self, fn, recurse=True):
        # dreamsim keeps each CLIP projection as a plain tensor and moves it to `extractor.device` at
        # every forward; keep both in step with the module's parameters.
        super()._apply(fn, recurse)
        pm = self.perceptual_model()
        for ext in pm.extractor_list:
            if isinstance(getattr(ext, "proj", None), torch.Tensor) and not isinstance(ext.proj, torch.nn.Parameter):
                ext.proj = fn(ext.proj)
            ext.device = next(ext.model.parameters()).device
        pm.device = self.device
        return self

    def info(self) -> dict:
        from importlib.metadata import version

        info = super().info()
        info["variant"] = self.variant
        info["cache_dir"] = str(self.cache_dir)
        info["weights"] = f"DreamSim release files in {self.cache_dir} (dreamsim {version('dreamsim')})"
        return info


def load_dreamsim(variant: str = "ensemble", cache_dir: str | os.PathLike | None = None) -> DreamSimEncoder:
    """Load `variant` with dreamsim.dreamsim() from the cache directory (see the module doc), on the CPU.

    Raises EncoderError, before calling dreamsim, when a file it would read (or download) is missing.
    """
    v = _variant(variant)
    root, source = resolve_cache_dir(cache_dir)
    missing = missing_files(variant, root)
    if missing:
        raise EncoderError(_missing_message(variant, root, source, missing))
    from dreamsim import dreamsim

    hub_dir = torch.hub.get_dir()
    out, err = io.StringIO(), io.StringIO()
    try:
        # dreamsim prints progress ("Using cached …") to stdout: keep it out of the CLI's output.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # dreamsim wraps the model with get_peft_model and then loads the adapter onto it again
            # (model.py, dreamsim()): peft warns about the second adapter config; expected here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model, _ = dreamsim(pretrained=True, device="cpu", cache_dir=str(root), normalize_embeds=True,
                                dreamsim_type=v.dreamsim_type, use_patch_model=v.patch)
    except Exception as exc:
        raise EncoderError(f"dreamsim could not load 'dreamsim:{variant}' from {root}: {exc}") from exc
    finally:
        if torch.hub.get_dir() != hub_dir:  # dreamsim points torch.hub at the cache for DINO backbones
            torch.hub.set_dir(hub_dir)
        for text in (out.getvalue(), err.getvalue()):
            if text.strip():
                log.debug("dreamsim: %s", text.strip())
    return DreamSimEncoder(model, variant, root)


@register_backend("dreamsim")  # its specs: registry._builtin_listers
def _load(arg: str, cache_dir: str | os.PathLike | None = None, **_) -> DreamSimEncoder:
    return load_dreamsim(arg or "ensemble", cache_dir=cache_dir)
