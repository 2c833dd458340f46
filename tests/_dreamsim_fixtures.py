"""A DreamSim cache directory in the exact release format, with random weights (tests only).

For the single-branch CLIP and OpenCLIP variants dreamsim 0.2.1 reads, from its cache directory:
  <variant>_pretrain.pth.tar   torch.save({'state_dict': …}) of its DINO-layout ViT-B/32
                               (feature_extraction/vision_transformer.vit_base with pos_drop replaced by
                               a LayerNorm, i.e. CLIP's ln_pre) plus 'proj' (768×512), loaded with
                               torch.load(weights_only=True) by load_clip_as_dino / load_open_clip_as_dino
  <variant>_single_lora/       a peft LoRA adapter of the whole PerceptualModel (adapter_config.json with
                               r, lora_alpha, lora_dropout, bias, target_modules; adapter_model.safetensors)
and nothing from a hub: open_clip is imported but no OpenCLIP/CLIP model is built or fetched.
The adapter is written by peft's own save_pretrained on dreamsim's own PerceptualModel, so its keys
are the ones dreamsim's PeftModel.from_pretrained expects.

Fixtures (registered by conftest.py): `release_cache`, and `synthetic_dreamsim`, which builds each
synthesised variant once per session.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

SYNTHETIC_VARIANTS = ("clip_vitb32", "open_clip_vitb32")
# LoRA hyper-parameters of dreamsim's configs/train_single_model_lora.yaml.
LORA = dict(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=["qkv"])


def _random_like(name: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if "norm" in name or name.startswith("pos_drop."):  # LayerNorms: weight ≈ 1, bias ≈ 0
        mean = 1.0 if name.endswith("weight") else 0.0
        return torch.empty(t.shape).normal_(mean, 0.05, generator=g)
    return torch.empty(t.shape).normal_(0.0, 0.02, generator=g)


def write_backbone(root: Path, variant: str, seed: int = 0) -> Path:
    """<variant>_pretrain.pth.tar with random weights, in the layout load_(open_)clip_as_dino reads."""
    from dreamsim.feature_extraction.vision_transformer import vit_base

    g = torch.Generator().manual_seed(seed)
    vit = vit_base(patch_size=32)
    vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)  # CLIP's ln_pre, as load_clip_as_dino builds it
    state = {k: _random_like(k, v, g) for k, v in vit.state_dict().items()}
    state["proj"] = torch.randn(vit.embed_dim, 512, generator=g) / math.sqrt(vit.embed_dim)
    path = root / f"{variant}_pretrain.pth.tar"
    torch.save({"state_dict": state}, path)
    return path


def write_lora_adapter(root: Path, variant: str, seed: int = 0) -> Path:
    """<variant>_single_lora/ written by peft from dreamsim's PerceptualModel, LoRA B ≠ 0 (so it matters)."""
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    model = PerceptualModel(**dreamsim_args["model_config"][variant], device="cpu", load_dir=str(root),
                            normalize_embeds=True)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    out = root / f"{variant}_single_lora"
    peft_model.save_pretrained(str(out))
    return out


def write_release_cache(root: Path, variants=SYNTHETIC_VARIANTS, seed: int = 0) -> Path:
    """Fill `root` with every file dreamsim() reads for `variants` (single-branch CLIP/OpenCLIP only)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, variant in enumerate(variants):
        if variant not in SYNTHETIC_VARIANTS:
            raise ValueError(f"cannot synthesise {variant!r} (DINO backbones come through torch.hub)")
        write_backbone(root, variant, seed + 10 * i)
        write_lora_adapter(root, variant, seed + 10 * i)
    return root


# --- a DINO variant: its release zip plus the torch.hub repository and backbone it loads -------------------

# Stands in for facebookresearch/dino's hubconf.py (which builds vision_transformer.vit_base and loads the
# checkpoint with torch.hub.load_state_dict_from_url): the same VisionTransformer (dreamsim's copy of DINO's),
# with 12 blocks of width 768 as dreamsim needs (it hooks block 11; CLS width 768), but a 1-wide MLP to keep
# the test's files small.
DINO_HUBCONF = '''dependencies = ["torch"]
from functools import partial

import torch
from torch import nn
from dreamsim.feature_extraction.vision_transformer import VisionTransformer


def dino_vitb16(pretrained=True, **kwargs):
    model = VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=1 / 768,
                              qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, **kwargs)
    if pretrained:
        url = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
        model.load_state_dict(torch.hub.load_state_dict_from_url(url, map_location="cpu"), strict=True)
    return model
'''


def write_dino_cache(root: Path, seed: int = 0) -> Path:
    """Fill `root` as dreamsim's cache for dino_vitb16 (hub repo, backbone, release files), random weights."""
    import importlib.util

    repo = root / "facebookresearch_dino_main"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "hubconf.py").write_text(DINO_HUBCONF)
    spec = importlib.util.spec_from_file_location("_dino_hubconf", repo / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    g = torch.Generator().manual_seed(seed)
    vit = hubconf.dino_vitb16(pretrained=False)
    (root / "checkpoints").mkdir(exist_ok=True)
    torch.save({k: _random_like(k, v, g) for k, v in vit.state_dict().items()},
               root / "checkpoints" / "dino_vitbase16_pretrain.pth")
    # the release's DINO checkpoint: dreamsim reads only the student's projection head from it
    head = {"module.head.mlp.0.weight": (2048, 768), "module.head.mlp.0.bias": (2048,),
            "module.head.mlp.2.weight": (2048, 2048), "module.head.mlp.2.bias": (2048,),
            "module.head.mlp.4.weight": (256, 2048), "module.head.mlp.4.bias": (256,),
            "module.head.last_layer.weight": (2048, 256)}
    torch.save({"student": {k: 0.02 * torch.randn(shape, generator=g) for k, shape in head.items()}},
               root / "dino_vitb16_pretrain.pth")
    hub_dir = torch.hub.get_dir()
    try:
        write_lora_adapter(root, "dino_vitb16", seed)  # dreamsim points torch.hub at root to build the model
    finally:
        torch.hub.set_dir(hub_dir)
    return root


@pytest.fixture(scope="session")
def release_cache(tmp_path_factory):
    """A cache directory with clip_vitb32 and open_clip_vitb32 in the release layout, random weights."""
    return write_release_cache(tmp_path_factory.mktemp("dreamsim-cache"))


@pytest.fixture(scope="session")
def synthetic_dreamsim(release_cache):
    """load(variant) → the `dreamsim:<variant>` encoder read from `release_cache`, built once per
    session (ask for `no_network` too in the test that first calls it)."""
    from encoder import load_encoder

    @functools.lru_cache(maxsize=None)
    def load(variant: str):
        return load_encoder(f"dreamsim:{variant}", cache_dir=release_cache)

    return load
