"""The header of a robret LipSim checkpoint (encoder.checkpoint), readable without importing torch
(`robret weights list` reads the provenance of cached checkpoints)."""
from __future__ import annotations

import os

from .io import read_header as _read_header
from .presets import LipSimConfig

__all__ = ["FORMAT", "VERSION", "read_header"]

FORMAT = "robret-lipsim"
VERSION = "1"


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a robret checkpoint, with `config` and `provenance` decoded."""
    return _read_header(path, FORMAT, VERSION, "LipSim checkpoint", config=LipSimConfig.from_json,
                        json_fields=("provenance",))
