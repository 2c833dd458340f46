"""JSON round-trip for the frozen training configs (tuples survive as tuples)."""
from __future__ import annotations

import dataclasses
import json

__all__ = ["ConfigMixin"]


class ConfigMixin:
    """Mixed into frozen dataclasses: `to_dict`, `to_json`, `from_dict`, `replace`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
