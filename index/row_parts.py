"""A store's rows one part a file, and which parts of an older version's copy a newer version may take as they are.

Readers of a segmented index (`index.mapped.MappedFlat`, `index.mapped_ivf.LayeredIVF`) give their stored rows as
`store.row_parts()` → (parts, row ids, dead rows): one part a file, in `index.layout.file_starts`' order (the
base, then each segment that adds rows), each part anything with `len` and row slicing that gives float32 arrays
(n_p, D); rows a later tombstone removed are dead. Two things are made from them, one piece a part: the GPU copy
(`index.gpu_scan.DeviceRows`) and the int8 codes (`index.codes.QuantizedCodes`).

Sharing. When a newer version of a gallery replaces an older one (a server's reload), both hold the same leading
files, up to `rows` stored rows (`index.layout.common_files`: same name, kind, SHA-256, rows and removed). Those
rows are the same bytes at the same places, so what was made from the older version's part p is what making it
again from the newer version's part p gives — provided part p is the same stretch of rows in both (`Layout.shares`
checks the bounds, all within `rows`, and the ids) and the newer version's live rows there are among the older's
(every row dead in the older is dead in the newer: a later file only adds tombstones to shared rows). Anything
made over the older part's live rows (a norm bound, a maximum) then covers the newer part's live rows, a subset.
Each user also compares the first and last rows of what it takes against the newer store's (a check of the
claim, not its proof).
"""
from __future__ import annotations

import numpy as np

__all__ = ["Layout", "RowsOf", "by_file", "row_parts"]


class RowsOf:
    """The vectors of `ids` as one part (`len` and row slicing), read through `store.reconstruct` a slice at a
    time: an IVF base's stored vectors from its mapped lists, with no copy of them all in host memory."""

    def __init__(self, store, ids: np.ndarray):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.store.reconstruct(self.ids[rows])


def row_parts(store) -> tuple[list, np.ndarray, np.ndarray, bool]:
    """(parts, row ids, dead rows, by_file) of a store: its `row_parts()` when it has one, else its live vectors as
    one part (`RowsOf(store, store.ids())`, nothing dead); by_file: `by_file(store)`."""
    parts = getattr(store, "row_parts", None)
    if parts is not None:
        return (*parts(), True)
    ids = np.asarray(store.ids(), np.int64)
    return [RowsOf(store, ids)], ids, np.zeros(0, np.int64), by_file(store)


def by_file(store) -> bool:
    """Whether the store's parts are its files, which a newer version may share: a store with `row_parts()`, or one
    mapped read-only from a single index file (`VectorStore.read(mapped=True)`: an IVF base with nothing layered on
    it, whose `ids()` order is the one `LayeredIVF.row_parts` gives that file when segments follow). Other stores'
    order is not tied to their files (a copying reader adds segments into its lists): nothing of them is shared."""
    return hasattr(store, "row_parts") or bool(getattr(store, "read_only", False))


class Layout:
    """Where each part's rows start (`starts`: part p holds rows starts[p] .. starts[p + 1] − 1), one id a row
    (`ids`) and the dead rows (`dead_rows`, sorted, each once)."""

    def __init__(self, sizes, ids, dead):
        self.ids = np.asarray(ids, np.int64)
        self.n = len(self.ids)
        self.starts = [0]
        for size in sizes:
            self.starts.append(self.starts[-1] + int(size))
        if self.starts[-1] != self.n:
            raise ValueError(f"{self.starts[-1]} rows in the parts for {self.n} ids")
        self.dead_rows = np.unique(np.asarray(dead, np.int64))
        if len(self.dead_rows) and not 0 <= self.dead_rows[0] <= self.dead_rows[-1] < self.n:
            raise ValueError(f"dead rows outside 0 .. {self.n - 1}")

    def dead_in(self, at: int, size: int) -> np.ndarray:
        """The dead rows in at .. at + size − 1."""
        d = self.dead_rows
        return d[np.searchsorted(d, at):np.searchsorted(d, at + size)]

    def alive_rows(self) -> np.ndarray:
        """The rows not dead, in order."""
        return np.setdiff1d(np.arange(self.n), self.dead_rows)

    def shares(self, older: "Layout", p: int, rows: int) -> bool:
        """Whether `older`'s part p may stand for this layout's part p (module doc, "Sharing"), given that the first
        `rows` stored rows of both versions are the same bytes: the same bounds, within those rows; the same ids;
        and every row dead in the older one dead in this one."""
        if p + 1 >= len(older.starts) or p + 1 >= len(self.starts):
            return False
        at, end = self.starts[p], self.starts[p + 1]
        return (older.starts[p] == at and older.starts[p + 1] == end and end <= int(rows)
                and np.array_equal(older.ids[at:end], self.ids[at:end])
                and bool(np.isin(older.dead_in(at, end - at), self.dead_in(at, end - at)).all()))
