"""A gallery's vectors on a CUDA GPU, searched with torch: the exact top-k a reader answers on a GPU (a Flat
gallery's mapped rows, index/mapped.py; an IVF gallery's every live vector where FAISS sees no GPU,
index/mapped_ivf.py; both through `GpuCopy`).

Why not FAISS's GPU flat index: it selects each query's top-k inside one thread block, so one query over N rows
is one block's work, however many the GPU has. On an H200 a certified top-10 at 10M vectors took 35 ms that way,
where reading the 5.2 GB of rows takes ~1.5 ms (docs/benchmarks.md, "FAISS on the GPU"). And FAISS's GPU build
is not what `pip install faiss-cpu` brings, while a CUDA build of torch is what embedding on a GPU already needs.

Here, for a tile of queries Q (t, D) and the rows X (N, D), all float32 on the device:
    S = Q·Xᵀ                     (cuBLAS, full float32: `encoder.protocol.full_float32_on_cuda`; TF32 off;
                                  one product a part of X: a mapped gallery's file, `DeviceRows`)
    S[:, dead] = −∞              (a mapped gallery's cleared rows: never taken while live rows remain)
    top-k of each row of S       (`torch.topk`: a selection spread over the whole GPU, then `_ordered`)
with t = max(1, TILE_SCORES // N) queries (half that with several parts: their blocks of S and S itself are held at
once), so at most TILE_SCORES scores are held (1 GiB; more only for a single query over more than 2²⁸ rows), and
the selection about a quarter of that again (a mask of S).

Soundness: every score is the float32 inner product of the same two vectors, summed in some order, with or
without fused multiply-adds, as cuBLAS computes in its default math mode; `encoder.certify.float32_dot_error`
bounds that in any order, as it bounds FAISS's CPU kernel. A GPU computing in reduced precision (TF32, or a
math mode a library set process-wide) would not be, so a copy is used only after `index.store.gpu_arithmetic_ratio`
finds its scores within the bound on probe queries (`GpuCopy.get`), and the matrix product runs after
`full_float32_on_cuda` every time.

Order: decreasing score and, among equal scores, increasing row, ties at the k-th score going to the lowest
rows: `index.store.scan_top`'s order, so both answer the same ids wherever their scores are equal.

The rows are copied CHUNK_ROWS at a time (from the mapped files, or as FAISS reconstructs them from an IVF's
mapped lists: no copy of the gallery in host memory), once per opened version (a reader's store does not change
once open), one part a file (a base, a segment's rows; rows a later tombstone removed are dead). A newer
version shares the parts of the files it has in common with the version it replaces (`GpuCopy.seed`): a server's
reload copies only what the checkpoint added, and the device holds the shared rows once.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

import numpy as np

from .row_parts import Layout

log = logging.getLogger(__name__)

__all__ = ["CopyStopped", "DeviceRows", "GpuCopy", "scan_device", "TILE_SCORES", "GPU_ERRORS_MAX", "NO_DEVICE"]

TILE_SCORES = 1 << 28  # scores (float32) one matrix product may hold: 1 GiB
GPU_ERRORS_MAX = 3  # searches failing on the GPU in a row after which a store searches on the CPU for good
NO_DEVICE = "no GPU that torch sees"  # `GpuCopy.why` on a machine without one


def scan_device():
    """torch's CUDA device when torch sees a GPU, else None. torch is imported only where a GPU can be (an NVIDIA
    or AMD device node), so commands that never embed on a CPU machine do not pay for importing it."""
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd")):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch.device("cuda") if torch.cuda.is_available() else None


class CopyStopped(Exception):
    """A copy abandoned between chunks because its `stop` event was set (the gallery closed, or the interpreter is
    exiting): not a failure of the GPU."""


class DeviceRows(Layout):
    """Float32 rows on `device`, their ids and dead rows; `top` and `search` (module doc).

    parts: the rows in order, as a sequence of parts, each anything with `len` and row slicing that gives float32
    arrays (n_p, dim): a store's `row_parts()` (index/row_parts.py: one part a file). Each part becomes one tensor,
    copied CHUNK_ROWS rows at a time; row_ids: one id per row of all parts; dead: rows never returned (`Layout`).
    stop: a threading.Event checked between chunks (`CopyStopped`).

    max_norm: M ≥ the norm of every row not dead, the largest of the parts' bounds, each `index.ivf.norm_bound` of
    the part's rows that were not dead in the copy that copied it.

    reuse: (an older copy, R) when the first R rows of `parts` are the older copy's first R rows (an older version of
    the same gallery: the files both share, `index.layout.common_files`). Every part of the older copy that may
    stand for this one's (`Layout.shares`: same bounds within R, same ids, its dead rows among this part's; and the
    same first and last rows) is shared, not copied: one tensor on the device for both versions (`reused` counts its
    rows), and its norm bound is kept, which bounds this copy's live rows (index/row_parts.py, "Sharing")."""

    def __init__(self, parts, row_ids: np.ndarray, dead: np.ndarray, device, dim: int, *, stop=None,
                 reuse: "tuple[DeviceRows, int] | None" = None):
        import torch

        from .ivf import norm_bound
        from .store import CHUNK_ROWS

        parts = list(parts)
        super().__init__([len(part) for part in parts], row_ids, dead)
        self.device = torch.device(device)
        self.dim = int(dim)
        self.parts: list = []  # one (n_p, dim) float32 tensor a part
        self.norms: list[float] = []  # `index.ivf.norm_bound` of each part's rows
        self.reused = 0
        self.shared_bytes = 0  # bytes of the tensors shared with the older copy
        for p, part in enumerate(parts):
            at, size = self.starts[p], len(part)
            shared = self._shared(reuse, p, part)
            if shared is None:
                tensor, norm = torch.empty((size, self.dim), dtype=torch.float32, device=self.device), 0.0
                alive = np.ones(size, bool)
                alive[self.dead_in(at, size) - at] = False
                for start in range(0, size, CHUNK_ROWS):
                    if stop is not None and stop.is_set():
                        raise CopyStopped("the copy to the GPU was stopped")
                    chunk = np.array(part[start:start + CHUNK_ROWS], np.float32)  # (a writable copy of one chunk)
                    if chunk.shape != (min(CHUNK_ROWS, size - start), self.dim):
                        raise ValueError(f"rows of shape {chunk.shape} at {at + start} of {self.n} rows of dimension "
                                         f"{self.dim}")
                    tensor[start:start + len(chunk)].copy_(torch.from_numpy(chunk))
                    live = alive[start:start + len(chunk)]
                    norm = max(norm, norm_bound(chunk if live.all() else chunk[live]))
            else:
                tensor, norm = shared
                self.reused += size
                self.shared_bytes += _nbytes(tensor)
            self.parts.append(tensor)
            self.norms.append(norm)
        self.max_norm = max(self.norms, default=0.0)
        self.dead = torch.as_tensor(self.dead_rows, device=self.device)
        self.alive = self.n - len(self.dead_rows)

    def _shared(self, reuse, p: int, part):
        """(tensor, norm bound) of the older copy's part p, when it can stand for `part` (class doc), else None."""
        if reuse is None:
            return None
        older, rows = reuse
        if older.device != self.device or older.dim != self.dim or not self.shares(older, p, rows):
            return None
        size = len(part)
        if size and not (np.array_equal(older.parts[p][:1].cpu().numpy(), np.asarray(part[0:1], np.float32))
                         and np.array_equal(older.parts[p][-1:].cpu().numpy(),
                                            np.asarray(part[size - 1:size], np.float32))):
            return None
        return older.parts[p], older.norms[p]

    @property
    def nbytes(self) -> int:
        """Device bytes of every part this copy uses (those shared with another version's copy included)."""
        return sum(_nbytes(tensor) for tensor in self.parts)

    def host_rows(self) -> np.ndarray:
        """Every row, copied back to host memory (n, dim) (for checks)."""
        import torch

        return torch.cat(self.parts).cpu().numpy() if self.parts else np.zeros((0, self.dim), np.float32)

    def _scores(self, part):
        """Scores (t, n) of queries `part` (t, dim) against every row: one product a part (module doc)."""
        import torch

        if len(part) == 1:
            if len(self.parts) == 1:
                return (self.parts[0] @ part[0])[None]
            s = torch.empty(self.n, dtype=torch.float32, device=self.device)
            for rows, a in zip(self.parts, self.starts):
                torch.mv(rows, part[0], out=s[a:a + len(rows)])
            return s[None]
        if len(self.parts) == 1:
            return part @ self.parts[0].T
        return torch.cat([part @ rows.T for rows in self.parts], dim=1)

    def top(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (n, k) float32, ids (n, k) int64, rows (n, take) int64) of float32 queries (n, D), take =
        min(k, live rows); past `take`, ids −1 with score −FLT_MAX (as `index.store.scan_top`)."""
        import torch

        from encoder.protocol import full_float32_on_cuda

        from .store import no_answers

        take = min(int(k), self.alive)
        out_scores, out_ids = no_answers(len(q), k)
        out_rows = np.empty((len(q), max(take, 0)), np.int64)
        if take <= 0 or len(q) == 0:
            return out_scores, out_ids, out_rows
        full_float32_on_cuda()
        # (several parts: each part's block of scores and their concatenation are held at once, so half as many)
        tile = max(1, TILE_SCORES // max(self.n, 1) // (1 if len(self.parts) == 1 else 2))
        queries = torch.from_numpy(np.ascontiguousarray(q, np.float32)).to(self.device)
        with torch.inference_mode():
            for a in range(0, len(q), tile):
                part = queries[a:a + tile]
                s = self._scores(part)
                if len(self.dead):
                    s.index_fill_(1, self.dead, -np.inf)
                vals, rows = _ordered(s, take)
                vals, rows = vals.cpu().numpy(), rows.cpu().numpy()
                out_scores[a:a + len(part), :take] = vals
                out_ids[a:a + len(part), :take] = self.ids[rows]
                out_rows[a:a + len(part)] = rows
        return out_scores, out_ids, out_rows

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of `top`: the interface `index.store.gpu_arithmetic_ratio` probes."""
        scores, ids, _ = self.top(np.asarray(q, np.float32).reshape(-1, self.dim), k)
        return scores, ids


def _nbytes(tensor) -> int:
    return tensor.nelement() * tensor.element_size()


def _ordered(s, take: int):
    """(values, columns) (t, take) of each row of `s` (t, N): its `take` largest, by decreasing value and, among
    equal values, increasing column; ties at the take-th value go to the lowest columns (`index.store._select`'s
    rule). `torch.topk` picks any of the tied columns, so a row whose take-th value is shared with a column it
    left out is taken again from all its columns equal to that value (in increasing order: `torch.nonzero`)."""
    import torch

    vals, cols = torch.topk(s, take, dim=1)
    last = vals[:, -1:]
    short = torch.nonzero((s == last).sum(dim=1) > (vals == last).sum(dim=1)).flatten().tolist()
    for r in short:
        above = cols[r][vals[r] > last[r]]
        tied = torch.nonzero(s[r] == last[r]).flatten()[:take - len(above)]
        cols[r] = torch.cat([above, tied])
        vals[r] = s[r][cols[r]]
    cols, perm = torch.sort(cols, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, cols.gather(1, perm)


class GpuCopy:
    """A read-only store's GPU copy and its state: made once per opened version (by the first search, or ahead on a
    background thread), checked, then used by every search; held by the store (index.mapped.MappedFlat,
    index.mapped_ivf.LayeredIVF), which gives its rows through `store.row_parts()` → (parts, row ids,
    dead rows) and is passed to each call (no reference back to it is kept).

    `get(store, wait, stop)`: the copy, or None (search on the CPU). The first call makes it: `scan_device()`, the
    rows copied (`DeviceRows`) and `index.store.gpu_arithmetic_ratio` ≤ 1, else robret warns once and the store
    searches on the CPU for good. While one thread makes it (seconds at 10M vectors), wait=False does not wait: that
    search runs on the CPU, so a server's requests do not stall behind a newly opened version's copy (except an IVF
    gallery's first certified queries, which need M from the copy: `LayeredIVF.max_norm`). With `deferred` set (a
    gallery that makes the copy on its own thread: `Gallery.prepare_search(background=True)`, which calls get with its
    stop event and `release` when done), only that thread makes it: other calls return None (wait=False) or wait
    for `release` (wait=True), so no request makes it in its own thread, unshared and unstoppable. `stop` (a
    threading.Event) abandons a copy between chunks: get returns None and a later call may make it.
    `seed(older, rows)`: the first `rows` rows of this store are those of the store `older` copied (an older
    version: `Gallery.prepare_search(previous=…)`); the copy shares that copy's parts there (`DeviceRows`' reuse),
    so a reload copies only the new files' rows and holds the shared ones once on the device.
    `top(store, q, k)`: `DeviceRows.top` on the copy, or None. A search that fails there (out of memory for its
    scores, say) returns None, to run on the CPU; GPU_ERRORS_MAX failures in a row make that permanent, and then
    the callbacks given to `when_failed` run (a gallery then builds its int8 codes for the CPU)."""

    def __init__(self):
        self.copy: DeviceRows | None = None
        self.failed = False
        self.why: str | None = None  # why it failed (NO_DEVICE: no GPU that torch sees)
        self.errors = 0  # searches on the GPU that failed in a row
        self.deferred = False
        self._settled = threading.Event()  # set by `release`
        self._lock = threading.Lock()  # one copy made at a time (a server's threads search at once)
        self._reuse: tuple[DeviceRows, int] | None = None
        self._when_failed: list = []

    @property
    def ready(self) -> bool:
        return self.copy is not None

    def seed(self, older: "GpuCopy | None", rows: int) -> None:
        copy = older.copy if older is not None else None
        with self._lock:  # (not between another thread's making of the copy and its setting: held for nothing)
            if copy is not None and int(rows) > 0 and self.copy is None:
                self._reuse = (copy, int(rows))

    def release(self) -> None:
        """The gallery's own thread is done with the copy (made it, failed, was stopped, or never got to it): it is
        no longer `deferred`, and callers waiting for it go on (making it themselves if it is still not made)."""
        self.deferred = False
        self._settled.set()

    def when_failed(self, callback) -> None:
        self._when_failed.append(callback)

    def get(self, store, wait: bool = False, stop=None) -> DeviceRows | None:
        if self.failed or self.copy is not None:
            return self.copy
        if self.deferred and stop is None:  # (the gallery's own thread makes it, passing its stop event)
            if not wait:
                return None
            self._settled.wait()  # (`release`, when that thread is done)
            if self.failed or self.copy is not None:
                return self.copy
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            if self.copy is not None or self.failed:
                return self.copy
            from .store import gpu_arithmetic_ratio

            device = scan_device()
            if device is None:
                self.failed, self.why = True, NO_DEVICE
                return None
            try:
                parts, row_ids, dead = store.row_parts()
                gpu = DeviceRows(parts, row_ids, dead, device, store.dim, stop=stop, reuse=self._reuse)
                ratio = gpu_arithmetic_ratio(gpu, store)
            except CopyStopped:  # (a close or exit: the older version's copy is not held for a copy never made)
                self._reuse = None
                return None
            except Exception as exc:  # out of GPU memory, …
                log.warning("searching on the CPU: could not copy the gallery to the GPU (%s)", exc)
                self.failed, self.why, self._reuse = True, f"copy failed: {exc}", None
                return None
            self._reuse = None  # (the older copy is not held past this one's making)
            if not ratio <= 1.0:
                log.warning("searching on the CPU: the GPU's inner products are off by %.3g× the float32 error "
                            "bound certificates rely on (reduced precision, e.g. TF32?)", ratio)
                self.failed, self.why = True, f"arithmetic check failed ({ratio:.3g}× the float32 bound)"
                return None
            self.copy = gpu
            return gpu
        finally:
            self._lock.release()

    def top(self, store, q: np.ndarray, k: int):
        gpu = self.get(store)
        if gpu is None:
            return None
        try:
            found = gpu.top(q, k)
        except Exception as exc:  # out of GPU memory for this batch's scores, …
            self.errors += 1
            if self.errors == 1:
                log.warning("this search ran on the CPU: the search on the GPU failed (%s)", exc)
            if self.errors >= GPU_ERRORS_MAX and not self.failed:  # not a passing shortage: stay on the CPU
                log.warning("searching on the CPU from now on: %d searches on the GPU failed", self.errors)
                self.copy, self.failed, self.why = None, True, f"{self.errors} searches failed: {exc}"
                for callback in self._when_failed:
                    try:
                        callback()
                    except Exception as err:  # (a closed gallery, …): this search still answers on the CPU
                        log.warning("after the GPU failed: %s", err)
            return None
        self.errors = 0
        return found
