"""Which pretrained weights are installed in the weights cache, where, and how big (`robret weights list`).

Torch-free: listing reads file names, sizes and safetensors headers, never model code. `encoder.fetch`
installs the files this module finds.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint_header import read_header
from .dreamsim_files import expected_files, missing_files
from .pretrained import PretrainedWeights, get_pretrained, lipsim_official_path, weights_root

__all__ = ["WeightStatus", "weight_status", "install_path"]

_MANIFEST = "fetched.json"


@dataclass(frozen=True)
class WeightStatus:
    """What `robret weights list` shows about one registry entry."""

    spec: str
    cached: bool
    path: Path  # the converted checkpoint (lipsim) or the DreamSim directory
    size: int | None  # bytes installed (None when not cached)
    sha256: dict[str, str | None]  # file name → published SHA-256, else the one recorded at fetch, else None
    contains_code: bool


def install_path(entry: PretrainedWeights, root: Path) -> Path:
    """Where `entry` is installed under the cache root `root`."""
    if entry.family == "lipsim":
        return lipsim_official_path(entry.spec.partition(":")[2], root)
    return root / "dreamsim"


def _installed(entry: PretrainedWeights, root: Path) -> bool:
    if entry.family == "lipsim":
        return install_path(entry, root).is_file()
    return not missing_files(entry.spec.partition(":")[2], install_path(entry, root))


def _installed_size(entry: PretrainedWeights, path: Path) -> int:
    """Bytes of the installed checkpoint, or of the files dreamsim reads for the variant."""
    if entry.family == "lipsim":
        return path.stat().st_size
    files = [path / rel for rel in expected_files(entry.spec.partition(":")[2])]
    lora = {p.parent for p in files if p.name == "adapter_config.json"}
    files += [p for d in lora for p in d.iterdir()]  # the adapter weights (.safetensors or .bin)
    return sum(p.stat().st_size for p in set(files) if p.is_file())


def _manifest(root: Path) -> dict:
    try:
        return json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def weight_status(spec: str, cache_dir: str | os.PathLike | None = None) -> WeightStatus:
    entry = get_pretrained(spec)
    root = weights_root(cache_dir)[0]
    path, cached = install_path(entry, root), _installed(entry, root)
    recorded = _manifest(root)
    if entry.family == "lipsim" and cached:
        prov = read_header(path)["provenance"]
        recorded = {**recorded, prov.get("file", ""): {"sha256": prov.get("sha256_original")}}
    sha = {f.name: f.sha256 or recorded.get(f.name, {}).get("sha256") for f in entry.files}
    return WeightStatus(spec, cached, path, _installed_size(entry, path) if cached else None, sha, entry.contains_code)
