"""Export an index: one row per indexed item with its vector, for pyarrow/pandas (`robret index export`).

Parquet (clip-retrieval's convention of one table of metadata and embeddings):
    id      int64                       the stable id (the FAISS id)
    path    string                      relative to the indexed folder (undecodable bytes as \\xNN, to read)
    path_bytes  binary                  the same path's bytes as the file system holds them (exact: a name with
                                        a literal "\\xe9" and one with the byte 0xE9 show alike in `path`)
    sha256  string                      SHA-256 hex of the file's bytes when it was embedded
    width   int32, height int32         displayed size (after EXIF orientation)
    vector  fixed_size_list<float32>[dim]   the stored unit vector, exactly as the index holds it
The file's key-value metadata records the encoder spec, the index version and the schema version.

NumPy: `vectors` (N, dim) float32 in OUT, and `ids` (N,) int64 in OUT's `.ids.npy` sibling, same order.
Rows are sorted by id; both files are written atomically (encoder.io.atomic_write).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from encoder.io import atomic_write

from .gallery import Gallery

__all__ = ["export_table", "export_parquet", "export_npy", "ids_path"]


def export_table(gallery: Gallery):
    """The gallery as a `pyarrow.Table` (module docstring), rows sorted by id."""
    import pyarrow as pa

    ids, vectors = gallery.all_vectors()
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], np.ascontiguousarray(vectors[order], dtype=np.float32)
    records = gallery.records(ids)
    missing = [int(i) for i, r in zip(ids, records) if r is None]
    if missing:
        raise RuntimeError(f"the catalog has no row for {len(missing)} index ids (e.g. {missing[0]}): run "
                           "`robret index verify`")
    dim = vectors.shape[1] if vectors.ndim == 2 else gallery.dim
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    columns = {
        "id": pa.array(ids, type=pa.int64()),
        "path": pa.array([r.path for r in records], type=pa.string()),
        "path_bytes": pa.array([bytes(r.path_key) for r in records], type=pa.binary()),
        "sha256": pa.array([r.content_hash for r in records], type=pa.string()),
        "width": pa.array([r.width for r in records], type=pa.int32()),
        "height": pa.array([r.height for r in records], type=pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
    }
    from retrieval.schema import SCHEMA_VERSION

    meta = {"robret.encoder": gallery.encoder_spec, "robret.index_version": str(gallery.version),
            "robret.schema": SCHEMA_VERSION, "robret.root": str(gallery.root)}
    return pa.table(columns).replace_schema_metadata(meta)


def export_parquet(gallery: Gallery, out: str | os.PathLike) -> int:
    """Write `export_table(gallery)` to the Parquet file `out`; returns the row count."""
    import pyarrow.parquet as pq

    table = export_table(gallery)
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    return table.num_rows


def ids_path(out: str | os.PathLike) -> Path:
    """Where `export_npy` writes the ids beside the vectors: x.npy → x.ids.npy."""
    out = Path(out)
    return out.with_name((out.name[:-4] if out.name.endswith(".npy") else out.name) + ".ids.npy")


def export_npy(gallery: Gallery, out: str | os.PathLike) -> tuple[Path, Path]:
    """Vectors (N, dim) float32 to `out`, ids (N,) int64 to `ids_path(out)`, sorted by id."""
    ids, vectors = gallery.all_vectors()
    order = np.argsort(ids, kind="stable")
    written = []
    for path, array in ((Path(out), np.ascontiguousarray(vectors[order], dtype=np.float32)),
                        (ids_path(out), ids[order].astype(np.int64))):
        atomic_write(path, lambda tmp, array=array: _save_npy(tmp, array))
        written.append(path)
    return written[0], written[1]



def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, array, allow_pickle=False)
