"""The page's settings: a frozen dataclass read from ROBRET_UI_* environment variables.

`robret ui` writes them for the `streamlit run` subprocess; tests set them before AppTest runs the page.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from encoder.pretrained import user_cache_root

__all__ = ["ENV_PREFIX", "UIConfig", "default_cache_dir"]

ENV_PREFIX = "ROBRET_UI_"


def default_cache_dir() -> Path:
    """$ROBRET_CACHE, else the user cache directory (encoder.pretrained.user_cache_root)."""
    return user_cache_root()


@dataclass(frozen=True)
class UIConfig:
    index_dir: str = ""  # a LipSim index directory; "" builds/reuses the demo index in cache_dir
    compare: str = ""  # comparison encoder spec; "" = DreamSim when its weights load, else standard:demo
    demo_encoder: str = ""  # encoder of the demo index; "" = lipsim:demo, or lipsim:cpu-small if not bundled
    cache_dir: str = ""  # demo index and comparison indexes; "" = default_cache_dir()
    max_upload_mb: int = 8  # uploads larger than this are refused (also streamlit's server.maxUploadSize)
    max_pixels: int = 40_000_000  # decoded uploads with more pixels are refused (decompression bombs)
    work_side: int = 1024  # the query is searched and attacked at this longest side (smaller ones kept as is)
    max_steps: int = 200  # attack steps allowed from the page
    rank_depth: int = 100  # how deep rankings are read to report where displaced items went
    attack_pool: int = 2000  # attacks optimise against the whole gallery up to this size, else its top-N
    max_options: int = 1000  # gallery picker: at most this many matching names listed at once

    @classmethod
    def from_env(cls, environ=None) -> "UIConfig":
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.type == "int":
                try:
                    raw = int(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX + f.name.upper()}={raw!r}: expected a whole number") from None
            values[f.name] = raw
        return cls(**values)

    def replace(self, **changes) -> "UIConfig":
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """Fields that differ from the defaults, as {name: value} (prefix and upper-case added by callers)."""
        default = UIConfig()
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
