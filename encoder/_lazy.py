"""Package attributes imported on first use (PEP 562), for `__init__` modules that re-export names.

    __getattr__, __dir__ = lazy_exports(__name__, {"Gallery": "gallery", ...}, globals())

Importing the package then imports none of its submodules: a command that needs one light module
(the catalog, the atomic writer) does not pay for torch or FAISS through the package's `__init__`.
"""
from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """(`__getattr__`, `__dir__`) for `package`: `exports` maps each public name to its submodule."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
