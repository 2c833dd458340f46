"""Which encoders the demo and the UI use when the user names none: one chooser for both.

LipSim: the bundled `lipsim:demo` checkpoint, else `lipsim:cpu-small` with random weights.
Comparison (the non-robust metric shown next to LipSim): DreamSim (`dreamsim:ensemble`, the paper's)
when its weights load, else the bundled standard CNN baseline, else raw pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .protocol import EncoderError

__all__ = ["DEFAULT_DREAMSIM", "COMPARE_FALLBACKS", "Choice", "default_lipsim_spec", "choose_comparison"]

log = logging.getLogger(__name__)

DEFAULT_DREAMSIM = "dreamsim:ensemble"
COMPARE_FALLBACKS = ("standard:demo", "pixels")
# what loading an encoder raises when its weights or backend are absent
_UNAVAILABLE = (ValueError, RuntimeError, OSError, ImportError)


@dataclass
class Choice:
    spec: str  # the registry spec chosen
    encoder: object  # the loaded encoder
    notes: list[str] = field(default_factory=list)  # why the preferred one was not used (for the user)


def default_lipsim_spec(spec: str | None = None) -> str:
    """`spec` if given, else lipsim:demo when bundled, else lipsim:cpu-small (random weights)."""
    from .registry import bundled_weights

    if spec:
        return spec
    return "lipsim:demo" if "demo" in bundled_weights("lipsim") else "lipsim:cpu-small"


def _first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an error's message, cut at a word boundary (with …) beyond `limit` characters."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " …"


def choose_comparison(spec: str | None = None, fallbacks=COMPARE_FALLBACKS, device=None) -> Choice:
    """The comparison encoder: `spec` if given (errors propagate), else DreamSim when it loads, else the
    first of `fallbacks` that loads. EncoderError when none does."""
    # Looked up on the package at call time: the registry's public entry point (and what tests replace).
    from . import load_encoder

    kw = {} if device is None else {"device": device}
    if spec:
        return Choice(spec, load_encoder(spec, **kw))
    try:
        return Choice(DEFAULT_DREAMSIM, load_encoder(DEFAULT_DREAMSIM, **kw))
    except _UNAVAILABLE as exc:
        why = _first_line(exc)
    failures = []
    for fallback in fallbacks:
        try:
            enc = load_encoder(fallback, **kw)
        except _UNAVAILABLE as exc:
            failures.append(f"{fallback}: {_first_line(exc)}")
            continue
        note = f"DreamSim is not available here ({why}); the comparison is {fallback}."
        log.info(note)
        return Choice(fallback, enc, [note] + [f"{f} (not loaded)" for f in failures])
    raise EncoderError(f"no comparison encoder: DreamSim is not available ({why}) and none of "
                       f"{', '.join(fallbacks)} loads ({'; '.join(failures)})")
