"""Typed errors of the gallery (index/). The CLI prints them; library code only raises and logs."""
from __future__ import annotations

__all__ = [
    "GalleryError",
    "CatalogError",
    "SchemaVersionError",
    "EncoderMismatchError",
    "StoreError",
    "IntegrityError",
    "IndexLockedError",
    "FolderError",
]


class GalleryError(RuntimeError):
    """Base class: an index directory cannot be opened, updated or trusted."""


class CatalogError(GalleryError):
    """The SQLAlchemy catalog is missing, malformed, or disagrees with the index file."""


class SchemaVersionError(CatalogError):
    """The catalog was written by a newer robret (a newer schema version than this code knows)."""


class EncoderMismatchError(CatalogError):
    """The encoder offered is not the one that embedded this gallery (never mix encoders)."""


class StoreError(GalleryError):
    """The FAISS index file is missing, corrupt, or of the wrong dimension/version."""


class IntegrityError(StoreError):
    """The index file's bytes do not match the SHA-256 the catalog committed with its version
    (corrupted or altered): nothing may be answered from it, and nothing built on it."""


class IndexLockedError(GalleryError):
    """Another process is writing this index directory."""


class FolderError(GalleryError, FileNotFoundError):
    """The image folder to index does not exist or is not a directory."""
