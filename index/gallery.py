"""A gallery: an opened index directory, read-only. The object the CLI, UI and attacks use.

    g = Gallery.open("photos-index/")
    scores, ids = g.search(q, k=10)           # q: (n, dim) unit-norm float32
    g.paths(ids[0]); g.vectors(ids[0]); g.encoder
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from . import embedder
from .catalog import Catalog, FileRecord, check_same_encoder
from .decode import DecodedImage, DecodeError, DecodeLimits, decode_bytes, hash_bytes, read_bytes, read_image
from .errors import StoreError
from .remote import is_remote
from .row_parts import by_file
from .codes import QuantizedCodes
from .ivf import CertifiedIVF
from .layout import IndexDir, common_files, file_starts, live_files
from .segments import load_live_store
from .mapped import MappedFlat
from .mapped_ivf import LayeredIVF
from .store import VectorStore

__all__ = ["Gallery", "open_gallery"]

log = logging.getLogger(__name__)

QUANTIZED_MIN = 100_000  # `Gallery.prepare_search` builds int8 codes for galleries of at least this many vectors


class Gallery:
    """Read access to one index directory: search, stored vectors, file records, the encoder.

    Opening loads the live files named by the catalog (a base and segments, each checked against its
    recorded SHA-256 and row count). A Flat gallery maps them in place (a read-only `index.mapped.MappedFlat`,
    which copies its rows to a GPU that torch sees, from the mapped files); searched on the CPU, an IVF gallery
    maps its base's lists (`VectorStore.read(mapped=True)`), segments layered on them
    (`index.mapped_ivf.LayeredIVF`); anything else is loaded into one FAISS index. The encoder is not loaded:
    it loads on first use of `.encoder` (and is checked against the recorded weights).
    A writer may update the directory meanwhile; this object keeps the version it opened.
    """

    def __init__(self, layout: IndexDir, catalog: Catalog, store: VectorStore | MappedFlat, meta: dict, encoder=None):
        self.layout, self.catalog, self.store, self.meta = layout, catalog, store, meta
        self._encoder = encoder
        self._root = os.fsencode(meta["root"])
        self._codes: QuantizedCodes | None = None
        self._codes_build = threading.Lock()  # one build at a time (held while building)
        self._codes_state = threading.Lock()  # short: the builder thread's start, setting or dropping the codes
        self._codes_thread: threading.Thread | None = None
        self._codes_stop = threading.Event()

    @classmethod
    def open(cls, index_dir, *, encoder=None, use_gpu: bool = True) -> "Gallery":
        """Open `index_dir`. `encoder` (optional) must be the one that built it; else it loads lazily.

        use_gpu=False keeps searches on the CPU even when a GPU is visible. With it, a Flat gallery is searched on
        the GPU that torch sees (index/mapped.py); an IVF gallery on the GPU that FAISS sees (index/store.py), else
        on the one torch sees (index/mapped_ivf.py).
        """
        layout = IndexDir(index_dir)
        catalog = layout.open_catalog()
        for attempt in range(5):
            meta = catalog.meta()
            try:
                store = load_live_store(layout, meta["index"], use_gpu=use_gpu, mapped=True)
                break
            except StoreError:
                # A writer may have committed a newer version and deleted this one in between.
                if attempt == 4 or catalog.meta()["index"]["version"] == meta["index"]["version"]:
                    raise
                time.sleep(0.05)
        if encoder is not None:
            check_same_encoder(meta["encoder"], embedder.identity(encoder, meta["encoder"]["spec"]))
        return cls(layout, catalog, store, meta, encoder)

    def close(self, keep_vectors: bool = False) -> None:
        """Close the catalog and let go of a mapped store (its files are unmapped once nothing else holds
        them; using the store afterwards is a StoreError). keep_vectors=True leaves the store searchable
        until this object is dropped (a server's requests still holding it while a newer version opens), and
        a background build of its codes running, which the newer version's build waits for and copies from
        (`prepare_search(previous=…)`)."""
        self.catalog.close()
        if keep_vectors:
            return
        self._codes_stop.set()  # a background build of codes (or of the GPU copy) ends at its next chunk, keeps nothing
        if isinstance(self.store, _Closed):
            return
        if self.store.read_only:  # mapped (MappedFlat, or IVF lists)
            # certified IVF views of mapped lists hold the FAISS index (CertifiedIVF.from_faiss), so a
            # search still running on them finishes before the file is unmapped
            self.store, self._ivf = _Closed(), None
            with self._codes_state:
                self._codes = None

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Facts ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.store.ntotal

    @property
    def root(self) -> Path | str:
        """The indexed folder, or the indexed object-store prefix as its URI (a str: `Path` would fold "//")."""
        return os.fsdecode(self._root) if is_remote(self._root) else Path(os.fsdecode(self._root))

    @property
    def index_dir(self) -> Path:
        return self.layout.path

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def version(self) -> int:
        return int(self.meta["index"]["version"])

    @property
    def encoder_spec(self) -> str:
        return self.meta["encoder"]["spec"]

    @property
    def encoder_info(self) -> dict:
        """The recorded identity: spec, name, dim, input_size, lipschitz, fingerprint."""
        return dict(self.meta["encoder"])

    @property
    def lipschitz(self) -> float | None:
        return self.meta["encoder"].get("lipschitz")

    @property
    def float_error(self) -> float | None:
        """The encoder's float error bound (encoder.protocol.measure_float_error): recorded in the catalog
        at build; measured on first use for galleries built before it was recorded."""
        recorded = self.meta["encoder"].get("float_error")
        if recorded is not None:
            return float(recorded)
        if self.lipschitz is None:
            return None
        return getattr(self.encoder, "float_error", None)

    @property
    def certified_ivf(self) -> CertifiedIVF | None:
        """The IVF index's lists with their radius bounds (index/ivf.py), for certified search without an
        exhaustive scan; None for other index types. Built once per opened version: exact bounds from the
        float32 vectors the index stores (a view, not a copy). None also for an IVF gallery searched on torch's GPU
        (`_torch_gpu`): its exhaustive search there is faster than certified IVF on the CPU."""
        if self.store.kind != "ivf" or len(self) == 0 or self._torch_gpu:
            return None
        if getattr(self, "_ivf", None) is None:
            layered = getattr(self.store, "certified_lists", None)  # a LayeredIVF (index/mapped_ivf.py)
            self._ivf = layered() if layered is not None else CertifiedIVF.from_faiss(self.store.index)
        return self._ivf

    @property
    def _torch_gpu(self) -> bool:
        """True while the store searches, or is about to search, on torch's GPU (`index.gpu_scan.GpuCopy`: made or
        being made, not failed); then certified queries take its exhaustive search (no certified IVF, no codes)."""
        gpu = getattr(self.store, "gpu", None)
        return gpu is not None and not gpu.failed

    @property
    def quantized(self) -> QuantizedCodes | None:
        """The int8 codes of the gallery's vectors (index/codes.py) once `prepare_search` has built them, else None.
        Certified search scans them instead of the float32 vectors (`retrieval.quantized_search`)."""
        return self._codes

    @property
    def quantizing(self) -> bool:
        """True while a background build of the codes runs (`prepare_search(background=True)`)."""
        thread = self._codes_thread
        return thread is not None and thread.is_alive()

    def prepare_search(self, background: bool = False, previous: "Gallery | None" = None,
                       codes: bool = True) -> QuantizedCodes | None:
        """Make what certified queries scan, once per opened version: on the CPU, the int8 codes that make them scan
        a quarter of the bytes, for galleries of at least QUANTIZED_MIN vectors with a Lipschitz encoder (returned;
        else None; codes=False: none at all); on torch's GPU, the gallery's copy there (below).

        A gallery searched on torch's GPU (a mapped store's `gpu`, index/gpu_scan.py) builds no codes; its GPU copy is
        made instead — for any gallery, codes or not — on the daemon thread with background=True (and then only
        there: requests search on the CPU until it is ready, `GpuCopy.deferred`). Should that GPU fail for good later
        (`GpuCopy.when_failed`), the codes are built then, in the background. (An IVF gallery on FAISS's GPU keeps its
        codes: its certified queries run on the CPU.)
        background=True returns at once (None until they are ready) and builds them on a daemon thread,
        stopped at its next chunk by `close` or at interpreter exit; queries meanwhile scan the float32
        vectors. For processes that answer many queries (`robret serve`, the page, a folder of queries):
        building costs about as much as 30–40 exact scans (docs/benchmarks.md, "Certified queries on int8 codes").

        previous: the gallery of an older version of this index directory, which this one replaces (a server's
        reload). The codes of the files both versions hold (`index.layout.common_files`: after a checkpoint that
        appended a segment, every older file) are previous's, shared rather than copied (index/row_parts.py), and
        only the other files are coded: memory holds the shared codes once. On torch's GPU, the copy shares
        previous's copy of those files instead (`_seed_gpu`): only the new files' rows are copied to the device.
        If its own build is still running, this build waits for it first: a server whose writer commits faster than
        a full build runs chains its builds instead of restarting one.
        """
        if self._codes is not None or not (self._wants_codes(codes) or self._torch_gpu):
            return self._codes
        if previous is not None and previous.index_dir != self.index_dir:
            previous = None
        if not background:
            return self._prepare_now(previous, codes)
        with self._codes_state:
            thread = self._codes_thread
            if (thread is None or not thread.is_alive()) and self._codes is None and not self._codes_stop.is_set():
                gpu = self.store.gpu if self._torch_gpu else None
                if gpu is not None and thread is None:
                    gpu.deferred = True  # (the copy is made on this thread, not in a request's; released when it ends)
                    gpu.when_failed(functools.partial(_codes_after_gpu, weakref.ref(self), codes))
                self._codes_thread = threading.Thread(target=_build_codes, args=(weakref.ref(self), previous, codes, gpu),
                                                      name="robret-codes", daemon=True)
                self._codes_thread._robret_stop = self._codes_stop
                _BUILDERS.add(self._codes_thread)
                try:
                    self._codes_thread.start()
                except RuntimeError:  # (no thread to be had): nothing will make the copy for the requests
                    if gpu is not None:
                        gpu.release()
                    raise
        return self._codes

    def _wants_codes(self, codes: bool = True) -> bool:
        return codes and self.lipschitz is not None and len(self) >= QUANTIZED_MIN

    def _prepare_now(self, previous: "Gallery | None", codes: bool = True) -> QuantizedCodes | None:
        """`prepare_search`'s build, in this thread (sharing `previous`'s codes where it can). A gallery searched on
        torch's GPU builds none: the GPU scans the float32 vectors faster. Asking makes its GPU copy (sharing
        previous's where both hold the same files), so a background build makes it off the requests' threads, which
        search on the CPU meanwhile (index/mapped.py); a close stops it at its next chunk."""
        if self._codes_stop.is_set():  # (closed)
            return self._codes
        # (an IVF on FAISS's GPU has no `gpu`: its certified IVF runs on the CPU and keeps its codes)
        if self._torch_gpu:
            self._seed_gpu(previous)
            store = self.store  # (read once: a close replaces it)
            if store.gpu.get(store, wait=True, stop=self._codes_stop) is not None or not store.gpu.failed:
                return None  # (on the GPU; or its copy stopped by a close: keep nothing; failed: codes for the CPU)
        if not self._wants_codes(codes):
            return self._codes
        with self._codes_build:
            if self._codes is None and not self._codes_stop.is_set():
                if previous is not None:
                    _wait_for_build(previous)  # (its codes, to share)
                old = previous.quantized if previous is not None else None
                built = QuantizedCodes.from_store(self.store, stop=self._codes_stop, reuse=old,
                                                  rows=self._shared_rows(previous) if old is not None else 0)
                with self._codes_state:  # (a close meanwhile set the stop flag: keep nothing)
                    if built is not None and not self._codes_stop.is_set():
                        self._codes = built
        return self._codes

    def _seed_gpu(self, previous: "Gallery | None") -> None:
        """Let this version's GPU copy share previous's in the files both hold (`index.gpu_scan.GpuCopy.seed`,
        `_shared_rows`), for the stores torch's GPU searches (a mapped Flat gallery, an IVF gallery's `LayeredIVF`);
        waits for previous's background build (which makes its copy) when one runs."""
        older = previous.__dict__.get("store") if previous is not None else None  # (a closed one's: _Closed)
        if type(older) is not type(self.store) or type(older) not in (MappedFlat, LayeredIVF):
            return
        _wait_for_build(previous)
        try:
            rows = self._shared_rows(previous)
            if rows:
                self.store.gpu.seed(previous.store.gpu, rows)
        except Exception as exc:  # (previous closed meanwhile, …): this copy is made in full
            log.warning("the GPU copy of version %d shares nothing with version %d's: %s", self.version,
                        previous.version, exc)

    def _shared_rows(self, previous: "Gallery | None") -> int:
        """How many leading stored rows this version holds in files previous also holds (`index.layout.common_files`,
        `file_starts`), for stores whose parts are their files (`index.row_parts.by_file`); else 0."""
        older = previous.__dict__.get("store") if previous is not None else None  # (a closed one's: _Closed)
        if older is None or isinstance(older, _Closed) or not (by_file(older) and by_file(self.store)):
            return 0
        common = common_files(live_files(previous.meta["index"]), self._live)
        return file_starts(self._live)[common] if common else 0

    @property
    def _live(self) -> list[dict]:
        return live_files(self.meta["index"])

    @property
    def max_norm(self) -> float:
        """M ≥ every stored vector's norm (`index.ivf.norm_bound`: within ~1e-5 relative of the largest;
        computed once per version)."""
        if self.certified_ivf is not None:
            return self.certified_ivf.max_norm
        key = (self.version, len(self))
        if getattr(self, "_max_norm", (None, None))[0] != key:
            self._max_norm = (key, self.store.max_norm())
        return self._max_norm[1]

    @property
    def exact(self) -> bool:
        """True when `search` (exact=False) is exhaustive for this index type and parameters."""
        return self.store.exact

    @property
    def encoder(self):
        """The encoder that built the gallery (loaded on first use, weights checked)."""
        if self._encoder is None:
            enc = embedder.load(self.encoder_spec)
            check_same_encoder(self.meta["encoder"], embedder.identity(enc, self.encoder_spec))
            self._encoder = enc
        return self._encoder

    # Search and vectors ---------------------------------------------------------------------
    def search(self, queries, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity: (scores (n, k) float32, ids (n, k) int64); −1 pads short galleries.

        queries: (n, dim) or (dim,) unit-norm float32. exact=True forces an exhaustive search on
        approximate index types (certificates need it).
        """
        return self.store.search(queries, min(int(k), max(1, len(self))), exact=exact)

    def ids(self) -> np.ndarray:
        """Every id in the index (int64)."""
        return self.store.ids()

    def vectors(self, ids) -> np.ndarray:
        """Stored unit vectors (n, dim) float32 for `ids` (StoreError for an unknown id)."""
        return self.store.reconstruct(ids)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), vectors (N, dim)) for the whole gallery: N·dim·4 bytes of memory."""
        ids = self.store.ids()
        return ids, self.store.reconstruct(ids)

    # Files ----------------------------------------------------------------------------------
    def _abs(self, key: bytes) -> Path | str:
        if is_remote(self._root):  # an object URI, read by read_bytes through index/remote.py
            return os.fsdecode(self._root.rstrip(b"/") + b"/" + key)
        return Path(os.fsdecode(os.path.join(self._root, key)))

    def records(self, ids) -> list[FileRecord | None]:
        """Catalog rows for `ids`, in order (None for an id the catalog does not know, such as one outside the
        64-bit ids a catalog holds)."""
        ids = [int(i) for i in np.asarray(ids, dtype=object).reshape(-1)]
        found = self.catalog.records(i for i in ids if 0 <= i < 2 ** 63)
        return [found.get(i) for i in ids]

    def record(self, id: int) -> FileRecord:
        rec = self.records([id])[0]
        if rec is None:
            raise KeyError(f"no file with id {id}")
        return rec

    def same_content(self, content_hash: str) -> list[int]:
        """Ids of the indexed files whose bytes have this SHA-256 (hex): the query itself and its exact copies."""
        return self.catalog.ids_with_content(content_hash)

    def paths(self, ids) -> list[Path | str | None]:
        """Absolute file paths for `ids`, in order (None for −1 or an unknown id); object URIs (str) for a
        gallery of an object store."""
        return [None if r is None else self._abs(r.path_key) for r in self.records(ids)]

    def path(self, id: int) -> Path | str:
        return self._abs(self.record(id).path_key)

    # Embedding ------------------------------------------------------------------------------
    def decode(self, path, limits: DecodeLimits | None = None) -> DecodedImage:
        """Read an image file with the gallery's hardened decoder (DecodeError with a reason)."""
        return read_image(path, limits or DecodeLimits(**self.meta.get("limits", {})))

    def image(self, id: int, limits: DecodeLimits | None = None) -> Image.Image:
        """The indexed file of `id`, decoded, only if it is still what was indexed.

        The file is opened once and checked on the opened descriptor: a regular file, inside the
        gallery's root (a symlink swapped in after indexing cannot show a file from elsewhere), whose
        SHA-256 is the recorded content hash — else DecodeError (kind `changed`: "changed since
        indexed"; or not_regular, symlink_escape, missing…). Callers silence PIL's
        DecompressionBombWarning (see decode.decode_bytes).
        """
        rec = self.record(id)
        limits = limits or DecodeLimits(**self.meta.get("limits", {}))
        data = read_bytes(self._abs(rec.path_key), limits.max_bytes, root=self._root)
        if rec.content_hash is None or hash_bytes(data) != rec.content_hash:
            raise DecodeError("changed", "changed since indexed (its content is not the indexed file's); "
                              "run `robret index update`")
        return decode_bytes(data, limits)[0]

    def embed_images(self, images) -> np.ndarray:
        """PIL images → (n, dim) unit-norm float32 with the gallery's encoder and preprocessing."""
        enc = self.encoder
        return embedder.embed_inputs(enc, [enc.preprocess(im) for im in images])

    def __repr__(self) -> str:
        if isinstance(self.store, _Closed):
            return f"Gallery({str(self.index_dir)!r}, closed)"
        return (f"Gallery({str(self.index_dir)!r}, {len(self)} vectors, {self.store.factory}, "
                f"encoder={self.encoder_spec!r}, version={self.version})")


def _wait_for_build(gallery: Gallery) -> None:
    """Wait for `gallery`'s background build of codes (or of its GPU copy) when one runs in another thread."""
    thread = gallery._codes_thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()  # (stopped at its next chunk by gallery.close() or at exit)


def _codes_after_gpu(ref, codes: bool) -> None:
    """A gallery's GPU failed for good after it had been searched there (`index.gpu_scan.GpuCopy.when_failed`):
    build its int8 codes for the CPU in the background, as if it had never had a GPU."""
    gallery = ref()
    if gallery is not None and not gallery._codes_stop.is_set():
        _wait_for_build(gallery)  # (the thread that made the copy, if it has not yet returned)
        gallery.prepare_search(background=True, codes=codes)


def _build_codes(ref, previous, codes: bool, gpu) -> None:
    try:
        gallery = ref()
        if gallery is not None:
            gallery._prepare_now(previous, codes)
    except Exception as exc:  # (a closed gallery's store, memory): queries keep scanning the float32 vectors
        log.warning("int8 codes not built: %s", exc)
    finally:  # the GPU copy made, failed, stopped or never reached: searches go on (and may make it themselves)
        if gpu is not None:
            gpu.release()


_BUILDERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_builders() -> None:
    """At exit, stop background builds of codes at their next chunk and wait for them (at most one chunk),
    so that no thread reads a mapping while the interpreter tears it down."""
    threads = list(_BUILDERS)
    for thread in threads:  # every flag first: a build waiting for an older one's (`_reuse`) ends with it
        gallery_stop = getattr(thread, "_robret_stop", None)
        if gallery_stop is not None:
            gallery_stop.set()
    for thread in threads:
        thread.join(timeout=5)


class _Closed:
    """The store of a closed gallery: every use is a StoreError."""

    def __getattr__(self, name):
        raise StoreError("the gallery was closed: open it again to search it")


def open_gallery(index_dir, *, encoder=None, use_gpu: bool = True) -> Gallery:
    """`Gallery.open(index_dir)`."""
    return Gallery.open(index_dir, encoder=encoder, use_gpu=use_gpu)
