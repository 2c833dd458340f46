"""The encoder package's base error, importable without torch (encoder.protocol re-exports it)."""
from __future__ import annotations

__all__ = ["EncoderError"]


class EncoderError(RuntimeError):
    """An encoder cannot be built or loaded (missing weights, wrong checkpoint format, …)."""
