"""What DreamSim needs on disk, per variant: release files, torch.hub backbones, the cache directory.

Torch-free, so that listing and checking weights (`robret weights list`, `robret encoder list`) does not
import the model code; `encoder.dreamsim_backend` builds the encoders from these facts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .pretrained import HUB_REPOS, dreamsim_required_files, dreamsim_weights, weights_root

__all__ = ["VARIANTS", "ENV_CACHE", "resolve_cache_dir", "expected_files", "missing_files", "fetch_command"]

ENV_CACHE = "ROBRET_DREAMSIM_CACHE"


@dataclass(frozen=True)
class _Variant:
    dreamsim_type: str  # dreamsim()'s dreamsim_type argument
    patch: bool  # dreamsim()'s use_patch_model argument
    hub: str | None = None  # torch.hub repo dreamsim loads the backbone from ("dino" / "dinov2")
    dim: int = 768  # embedding dimension

    @property
    def key(self) -> str:
        """The variant's key in dreamsim's own tables (dreamsim_weights, download_weights)."""
        return self.dreamsim_type + ("_patch" if self.patch else "")

    @property
    def release_files(self) -> tuple[str, ...]:
        """What the release zip unpacks into the cache directory (read from dreamsim.model)."""
        return dreamsim_required_files()[self.key]

    @property
    def lora_dir(self) -> str:
        """The peft adapter folder among the release files."""
        return next(f for f in self.release_files if f.endswith("_lora"))


# dreamsim 0.2.1, model.py (dreamsim) and feature_extraction/extractor.py.
VARIANTS: dict[str, _Variant] = {
    "ensemble": _Variant("ensemble", False, hub="dino", dim=768 + 512 + 512),
    "dino_vitb16": _Variant("dino_vitb16", False, hub="dino"),
    "dinov2_vitb14": _Variant("dinov2_vitb14", False, hub="dinov2"),
    "clip_vitb32": _Variant("clip_vitb32", False, dim=512),
    "open_clip_vitb32": _Variant("open_clip_vitb32", False, dim=512),
    "synclr_vitb16": _Variant("synclr_vitb16", False),
    "dino_vitb16_patch": _Variant("dino_vitb16", True, hub="dino", dim=2 * 768),
    "dinov2_vitb14_patch": _Variant("dinov2_vitb14", True, hub="dinov2", dim=2 * 768),
}


def _hub_files(hub: str | None) -> tuple[tuple[str, str], ...]:
    """(path under the cache directory, what it is) for the torch.hub repository and backbone of `hub`.

    dreamsim sets torch.hub's directory to the cache directory and loads these backbones through
    torch.hub.load (the code of the repo, then the checkpoint via load_state_dict_from_url); they are
    not in the release zips.
    """
    if hub is None:
        return ()
    repo = HUB_REPOS[hub]
    return ((f"{repo.folder}/hubconf.py", f"{repo.archive.url} (unpacked as {repo.folder})"),
            (repo.backbone.install_as, repo.backbone.url))


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft reads either


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(directory, where it came from): the argument, else $ROBRET_DREAMSIM_CACHE, else the default."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve(), "the cache_dir argument (--cache-dir)"
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV_CACHE}"
    root, source = weights_root()
    return root / "dreamsim", f"the dreamsim folder of the weights cache, {source}; or set ${ENV_CACHE}"


def _variant(name: str) -> _Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown DreamSim variant {name!r}; known: {', '.join(VARIANTS)}") from None


def expected_files(variant: str) -> list[str]:
    """Paths, relative to the cache directory, that dreamsim reads for `variant` (adapter: .safetensors or .bin)."""
    v = _variant(variant)
    files = [f for f in v.release_files if f != v.lora_dir]
    files += [f"{v.lora_dir}/adapter_config.json", f"{v.lora_dir}/{_ADAPTER_WEIGHTS[0]}"]
    files += [path for path, _ in _hub_files(v.hub)]
    return files


def missing_files(variant: str, root: Path) -> list[str]:
    """The expected_files(variant) that `root` lacks (a .bin adapter stands in for the .safetensors one)."""
    v = _variant(variant)
    missing = []
    for rel in expected_files(variant):
        if rel == f"{v.lora_dir}/{_ADAPTER_WEIGHTS[0]}":
            if not any((root / v.lora_dir / name).is_file() for name in _ADAPTER_WEIGHTS):
                missing.append(rel)
        elif not (root / rel).exists():
            missing.append(rel)
    return missing


def _release_url(v: _Variant) -> str:
    return dreamsim_weights()[v.key]


def fetch_command(spec: str, root: Path) -> str:
    """The `robret weights fetch` command that installs `spec` into the DreamSim directory `root`."""
    if root == weights_root()[0] / "dreamsim":
        return f"robret weights fetch {spec}"
    if root.name == "dreamsim":
        return f"robret weights fetch {spec} --cache-dir {root.parent}"
    return f"robret weights fetch {spec} --cache-dir ROOT (it installs into ROOT/dreamsim; use that directory)"


def _missing_message(variant: str, root: Path, source: str, missing: list[str]) -> str:
    v = VARIANTS[variant]
    try:
        url = _release_url(v)
    except Exception:  # the message must not fail because dreamsim cannot be imported
        url = "the dreamsim release zip for this variant (dreamsim.config.dreamsim_weights)"
    lines = [
        f"DreamSim weights for 'dreamsim:{variant}' are missing from {root} (cache directory from {source}).",
        "Expected there:",
        *(f"  {rel}{'   (or adapter_model.bin)' if rel.endswith(_ADAPTER_WEIGHTS[0]) else ''}"
          f"{'   <- missing' if rel in missing else ''}" for rel in expected_files(variant)),
        f"Fetch them (download, verify, unpack): {fetch_command(f'dreamsim:{variant}', root)}",
        f"  or, with files obtained elsewhere: robret weights import dreamsim:{variant} FILE|DIR"
        f"{'' if root.name == 'dreamsim' else ' --cache-dir ROOT (then use ROOT/dreamsim)'}",
        f"  By hand: download {url} and unpack it there: mkdir -p {root} && cd {root} && "
        f"unzip {url.rsplit('/', 1)[-1]}",
    ]
    if v.hub:
        lines.append(f"  Not in the zip: dreamsim loads the {'DINOv2' if v.hub == 'dinov2' else 'DINO'} backbone "
                     "with torch.hub from this directory, which needs")
        lines += [f"    {path}: {what}" for path, what in _hub_files(v.hub)]
    return "\n".join(lines)
