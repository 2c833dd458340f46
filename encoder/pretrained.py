"""Pretrained weights as data (open_clip's pretrained tags, timm's pretrained configs) and where they live.

Every downloadable model is a `PretrainedWeights` entry: the encoder spec it serves, the files to fetch
(an HTTP URL or a Google Drive id, size and SHA-256 where upstream publishes them), a licence line and
a citation. `encoder.fetch` downloads, verifies and installs them; nothing here touches the network or
the disk, and nothing is downloaded at load time.

Sources read from the installed packages rather than copied: DreamSim's release-zip URLs
(`dreamsim.config.dreamsim_weights`) and the files each variant needs (the `dreamsim_required_ckpts`
table inside `dreamsim.model.download_weights`, read from its source with `ast`).

Weights cache root (`weights_root`): the cache_dir argument (`--cache-dir`), else $ROBRET_WEIGHTS_DIR,
else the platform's user cache directory for robret (platformdirs: $XDG_CACHE_HOME/robret on Linux):
    <root>/lipsim/official-m0.5.safetensors   an official checkpoint converted to robret's format
    <root>/dreamsim/                          dreamsim's own cache layout (release zips unpacked, plus
                                              the torch.hub directory of the DINO backbones)
    <root>/.partial/                          interrupted downloads, resumed by the next fetch
    <root>/fetched.json                       SHA-256 and size of every verified download
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .errors import EncoderError

__all__ = ["RemoteFile", "PretrainedWeights", "ENV_WEIGHTS", "ENV_MIRROR", "user_cache_root", "weights_root",
           "list_pretrained", "get_pretrained", "lipsim_official_path", "dreamsim_required_files", "HUB_REPOS",
           "LIPSIM_OFFICIAL"]

ENV_WEIGHTS = "ROBRET_WEIGHTS_DIR"
ENV_MIRROR = "ROBRET_WEIGHTS_MIRROR"


@dataclass(frozen=True)
class RemoteFile:
    """One file to download; `name` is also its name on a mirror (`--mirror URL` serves URL/name)."""

    name: str  # unique across the registry
    url: str | None = None  # HTTP(S) source (None when only `drive_id` is known)
    drive_id: str | None = None  # Google Drive file id, fetched with gdown
    size: int | None = None  # bytes; None: not published upstream (recorded on first verified fetch)
    sha256: str | None = None  # hex digest; None: not published upstream (recorded on first verified fetch)
    kind: str = "torch"  # "torch": a torch.save file; "zip": an archive unpacked into the install folder
    install_as: str = ""  # where it goes, relative to the family folder ("" for zips unpacked in place)
    strip_top: bool = False  # zips: drop the archive's single top folder (GitHub archives) and use install_as
    contains_code: bool = False  # Python code that torch.hub imports (pinned to `commit`)
    commit: str | None = None  # the pinned commit of a repository archive

    @property
    def source(self) -> str:
        return self.url or f"https://drive.google.com/uc?id={self.drive_id}"


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights that an encoder spec loads from the cache once `robret weights fetch SPEC` installed them."""

    spec: str  # encoder spec, e.g. "lipsim:official-m0.5", "dreamsim:ensemble"
    family: str  # folder under the cache root and install rule: "lipsim" (converted) or "dreamsim"
    files: tuple[RemoteFile, ...]  # everything to download
    description: str  # one line for `robret weights list`
    licence: str  # licence of the weights (and code, if any)
    citation: str  # the paper to cite

    @property
    def contains_code(self) -> bool:
        return any(f.contains_code for f in self.files)


_LIPSIM_CITATION = ("Ghazanfari, Garg, Krishnamurthy, Khorrami, Araujo: LipSim: A Provably Robust Perceptual "
                    "Similarity Metric, ICLR 2024 (arXiv 2310.18274)")
_LIPSIM_LICENCE = "MIT (github.com/SaraGhazanfari/lipsim)"
# Google Drive ids from the LipSim README (the `small` preset distilled from the DreamSim ensemble).
LIPSIM_OFFICIAL: dict[str, tuple[str, str]] = {
    "official-pretrained": ("1Y39Wnpxq3ZS8JMRe6j-Yx7x3E_nardbv", "LipSim-small, stage 1 (distilled from DreamSim)"),
    "official-m0.2": ("1OHRP0uwFrRJ6zXsPrCUDxlTjALa_690c", "LipSim-small fine-tuned on NIGHTS, margin 0.2"),
    "official-m0.5": ("11JoY5jrm4qmk0QmncQ5eVqXQpXQNLG1X", "LipSim-small fine-tuned on NIGHTS, margin 0.5"),
}

_DREAMSIM_CITATION = ("Fu, Tamir, Sundaram, Chai, Zhang, Dekel, Isola: DreamSim: Learning New Dimensions of "
                      "Human Visual Similarity using Synthetic Data, NeurIPS 2023 (arXiv 2306.09344)")
_DREAMSIM_LICENCE = "MIT (github.com/ssundaram21/dreamsim)"


@dataclass(frozen=True)
class HubRepo:
    """A torch.hub repository DreamSim loads a backbone from, pinned to one commit, and that backbone."""

    folder: str  # torch.hub's folder name for the repository (owner_repo_branch)
    archive: RemoteFile  # the repository at the pinned commit
    backbone: RemoteFile  # the checkpoint its hubconf fetches with load_state_dict_from_url
    licence: str
    citation: str


def _github_archive(owner_repo: str, commit: str, folder: str) -> RemoteFile:
    return RemoteFile(name=f"{folder}-{commit[:12]}.zip", url=f"https://github.com/{owner_repo}/archive/{commit}.zip",
                      kind="zip", install_as=folder, strip_top=True, contains_code=True, commit=commit)


# dreamsim's extractor calls torch.hub.load('facebookresearch/dino:main', …) and
# torch.hub.load('facebookresearch/dinov2', …) with torch.hub's directory set to its cache folder.
HUB_REPOS: dict[str, HubRepo] = {
    "dino": HubRepo(
        folder="facebookresearch_dino_main",
        archive=_github_archive("facebookresearch/dino", "144f70567a6ff853b9ea44503ba37fdcf8ca41fb",
                                "facebookresearch_dino_main"),
        backbone=RemoteFile(name="dino_vitbase16_pretrain.pth", install_as="checkpoints/dino_vitbase16_pretrain.pth",
                            url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
                                "dino_vitbase16_pretrain.pth"),
        licence="Apache-2.0 (github.com/facebookresearch/dino)",
        citation="Caron et al.: Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021",
    ),
    "dinov2": HubRepo(
        folder="facebookresearch_dinov2_main",
        archive=_github_archive("facebookresearch/dinov2", "12592a9bdfea0a6e4ee4767cd5a8d3195c0e3509",
                                "facebookresearch_dinov2_main"),
        backbone=RemoteFile(name="dinov2_vitb14_pretrain.pth", install_as="checkpoints/dinov2_vitb14_pretrain.pth",
                            url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
        licence="Apache-2.0 (github.com/facebookresearch/dinov2)",
        citation="Oquab et al.: DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024",
    ),
}


@functools.cache
def _dreamsim_tree(module: str) -> ast.Module:
    """The parsed source of the installed dreamsim/<module>.py, found without importing dreamsim (its
    `__init__` imports the model, hence torch: listing weights must not)."""
    spec = importlib.util.find_spec("dreamsim")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("the dreamsim package is not installed (pip install dreamsim)")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{module}.py"
    return ast.parse(path.read_text(encoding="utf-8"))


def _dreamsim_literal(module: str, name: str):
    """The literal value assigned to `name` in dreamsim/<module>.py (at any depth), read with `ast`."""
    for node in ast.walk(_dreamsim_tree(module)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise EncoderError(f"dreamsim.{module} no longer holds its `{name}` table; this dreamsim version is not "
                       "supported by `robret weights`")


def dreamsim_weights() -> dict[str, str]:
    """{variant: release zip URL}, dreamsim.config.dreamsim_weights as installed."""
    return dict(_dreamsim_literal("config", "dreamsim_weights"))


def dreamsim_hub(variant: str) -> str | None:
    """'dino', 'dinov2' or None: the torch.hub backbone dreamsim loads for `variant` (from dreamsim_args)."""
    dreamsim_args = _dreamsim_literal("config", "dreamsim_args")
    model_type = dreamsim_args["model_config"][variant.removesuffix("_patch")]["model_type"]
    return "dinov2" if "dinov2" in model_type else "dino" if "dino_" in model_type else None


@functools.cache
def dreamsim_required_files() -> dict[str, tuple[str, ...]]:
    """{variant: files and folders its release zip provides}, read from dreamsim.model.download_weights."""
    return {k: tuple(v) for k, v in _dreamsim_literal("model", "dreamsim_required_ckpts").items()}


def _dreamsim_entries() -> list[PretrainedWeights]:
    entries = []
    for variant, url in dreamsim_weights().items():
        files = [RemoteFile(name=url.rsplit("/", 1)[-1], url=url, kind="zip")]
        hub = dreamsim_hub(variant)
        licence, citation = _DREAMSIM_LICENCE, _DREAMSIM_CITATION
        if hub:
            files += [HUB_REPOS[hub].archive, HUB_REPOS[hub].backbone]
            licence += f"; backbone {HUB_REPOS[hub].licence}"
            citation += f"; backbone: {HUB_REPOS[hub].citation}"
        entries.append(PretrainedWeights(
            spec=f"dreamsim:{variant}", family="dreamsim", files=tuple(files),
            description=f"DreamSim {variant} (release {url.rsplit('/', 2)[-2]})", licence=licence, citation=citation,
        ))
    return entries


@functools.cache
def _registry() -> dict[str, PretrainedWeights]:
    entries = [
        PretrainedWeights(
            spec=f"lipsim:{tag}", family="lipsim",
            files=(RemoteFile(name=f"lipsim-{tag}.pth", drive_id=drive_id),),
            description=f"{what} (official .pth, converted to safetensors on fetch)",
            licence=_LIPSIM_LICENCE, citation=_LIPSIM_CITATION,
        )
        for tag, (drive_id, what) in LIPSIM_OFFICIAL.items()
    ]
    entries += _dreamsim_entries()
    return {e.spec: e for e in entries}


def list_pretrained() -> list[PretrainedWeights]:
    """Every downloadable weight, LipSim first."""
    return list(_registry().values())


def get_pretrained(spec: str) -> PretrainedWeights:
    """The registry entry for `spec`; ValueError listing the known specs otherwise."""
    try:
        return _registry()[spec]
    except KeyError:
        raise ValueError(f"no downloadable weights for {spec!r}; known: {', '.join(_registry())}") from None


def user_cache_root() -> Path:
    """robret's user cache directory: $ROBRET_CACHE, else the platform's (platformdirs; XDG on Linux)."""
    if os.environ.get("ROBRET_CACHE"):
        return Path(os.environ["ROBRET_CACHE"]).expanduser()
    return Path(platformdirs.user_cache_dir("robret", appauthor=False))


def weights_root(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(weights cache root, where it came from): the argument, else $ROBRET_WEIGHTS_DIR, else the user cache."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve(), "--cache-dir"
    if os.environ.get(ENV_WEIGHTS):
        return Path(os.environ[ENV_WEIGHTS]).expanduser().resolve(), f"${ENV_WEIGHTS}"
    return user_cache_root().resolve(), f"the default (set ${ENV_WEIGHTS}, or a weights command's --cache-dir)"


def lipsim_official_path(tag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `lipsim:<tag>` (an official checkpoint) lives once fetched and converted."""
    return weights_root(cache_dir)[0] / "lipsim" / f"{tag}.safetensors"
