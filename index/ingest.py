"""Fill and refresh a gallery from an image folder: incremental, batched, crash-safe.

    report = build_index("photos/", "photos-index/", encoder_spec="lipsim:demo")
    report = update_index("photos-index/")        # re-scan the folder recorded at build
    report = repair_index("photos-index/")        # also recovers from a lost or corrupt index file

Incremental rules (per file, keyed by its path relative to the root):
- same size and mtime as recorded → skipped unchanged (no read);
- otherwise read and hashed: same content hash → only size/mtime refreshed; a hash whose vector the
  gallery already holds → that vector is reused (a renamed file keeps its row and id; a copy gets a
  new id and a copy of the vector); else decoded and embedded (a changed file keeps its id);
- recorded files no longer present → tombstoned (status "removed") and removed from the index;
- files that fail are recorded with their reason and not retried until they change (or
  `retry_failed`); objects of an object store that were `unreadable` (network, throttling) are retried at
  every update. Nothing a file contains aborts the run.

Commit protocol (crash safety). The catalog's committed `index.segments` names the live set (index/
layout.py): at most one base (a whole FAISS index, `vectors.<v>.faiss`) followed by segments
(`segment.<v>.rows`, index/segments.py), each with its SHA-256 and row count. Work happens in memory
(FAISS index + pending row changes + what changed since the last checkpoint: the ids added, and the
committed ids removed); a checkpoint then
  1. writes ONE new file: normally a segment holding only the rows added since the previous checkpoint
     and the ids it removed (tombstones) — temporary file, fsync, rename, directory fsync — so that a
     checkpoint costs what changed, not the gallery's size; or, when a whole index is due (nothing live
     yet, the index type changed, an HNSW graph was rebuilt by a removal, `repair`, the live set
     already holds `compact_segments` segments, or the size-tiered merge reaches the first file), a new
     base `vectors.<v+1>.faiss` the same way; a segment may also take in the newest live segments
     (size-tiered merging, `_Writer._merge_start`), which then leave the live set;
  2. commits, in ONE catalog transaction, every pending row change together with index.version = v+1,
     its live set (the previous one plus the segment, or the base alone), row count and ids digest;
  3. deletes files outside the new live set (after a base: the files it replaces) and any leftovers.
Killed before 2 commits, the catalog still names v's live set, whose files are intact (files are never
rewritten, and step 3 has not run): the work since the last checkpoint is simply redone by the next
update. Killed after 2, the catalog names v+1, whose files are complete. Either way the rows marked
indexed are exactly the ids the live set yields: nothing is lost, duplicated or orphaned. Checkpoints
happen every `checkpoint_seconds` (and at the end). `compact_index` merges the live set into one base
with the same steps (no row changes); a writer deletes orphan files of a killed checkpoint when it opens.

`ROBRET_INDEX_CRASH_AT="point:n[,point:n]"` SIGKILLs the process at the n-th passage of a point —
batch (after a batch is added in memory), segment (a segment's temporary file half written, nothing
fsynced), write (the new file's temporary file durable, before the rename), rename (after the rename,
before the catalog commit), commit (after the commit, before cleanup), and in `compact_index`
compact-write, compact-rename, compact-commit (the same moments) — so that tests can kill a build at
exact moments. Unset, it costs one dict lookup per point.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import shutil
import signal
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from encoder.image import DecodeBudget, decode_cost

from . import embedder
from .catalog import FAILED, INDEXED, REMOVED, SCHEMA_VERSION, Catalog, ids_digest, make_engine, recorded_url, safe_url, utcnow
from .decode import DecodeError, DecodeLimits, check_shape, decode_bytes, hash_bytes, oriented_size, read_bytes
from .errors import CatalogError, EncoderMismatchError, FolderError, IntegrityError, StoreError
from .layout import BASE, ROWS, IndexDir, live_files
from .remote import is_remote
from .scan import ScanEntry, display_path
from .segments import load_live_store, read_segment, segment_bytes, write_segment
from .sources import Source, resolve_source, scan_source
from .store import IVF_MIN_POINTS_PER_LIST, NORM_TOLERANCE, VectorStore, parse_factory, target_factory

__all__ = ["IngestOptions", "IngestReport", "build_index", "build_cache_index", "update_index", "repair_index",
           "compact_index",
           "load_live_store", "CRASH_ENV", "COMPACT_SEGMENTS", "preprocess_bytes"]

log = logging.getLogger(__name__)
CRASH_ENV = "ROBRET_INDEX_CRASH_AT"
# A checkpoint compacts (writes one base) instead of appending once the live set holds this many
# segments: opening then reads at most this many files besides the base. (Size-tiered merging,
# `_Writer._merge_start`, keeps far fewer: O(log n).)
COMPACT_SEGMENTS = 32


@dataclass
class IngestOptions:
    """How a build/update runs (none of this changes what ends up in the index)."""

    batch_size: int = 32  # images per encoder call
    workers: int = max(1, min(4, os.cpu_count() or 1))  # decode threads
    checkpoint_seconds: float = 120.0  # write index + commit catalog at least this often
    limits: DecodeLimits | None = None  # None: the limits recorded at build (defaults at build)
    retry_failed: bool = False  # re-read files that failed before even if unchanged
    progress: bool = False  # tqdm progress bar (images/s) on stderr
    use_gpu: bool = True  # FAISS and the encoder on the GPU when one is visible
    decode_memory: int = 512 * 2**20  # bytes of decoded pixels held at once across workers (large images wait)
    # Decode + embed elsewhere (e.g. index.ray_embed.RayEmbedder): called once per run with the absolute
    # paths to embed (bytes, already hashed here), the recorded encoder identity, the limits and the indexed
    # root (every read must be confined to it: index.decode.read_bytes(path, max_bytes, root)); yields
    # (position, dict(vector, digest, size, width, height, notes) | DecodeError) in any order.
    # None: decode and embed in this process.
    embed_files: object = None
    # A checkpoint writes one base (all vectors) instead of a segment once the live set already holds
    # this many segments; 0: every checkpoint rewrites the whole index (the layout before segments);
    # None: never automatically (`robret index compact` does it).
    compact_segments: int | None = COMPACT_SEGMENTS
    # Size-tiered merging (`_Writer._merge_start`): a checkpoint's segment also takes in the newest live
    # files while they are no larger than what it already holds (a base when it reaches the first file),
    # so that a row is rewritten O(log n) times over a build. Off with compact_segments=None.
    merge_tiers: bool = True
    # An update or repair that finds no file at all where the catalog holds some (an unmounted drive, a folder
    # emptied by mistake) stops with FolderError, changing nothing, unless this is set: then every item is removed.
    allow_empty: bool = False


@dataclass
class IngestReport:
    """What a build/update did. `failed` lists (path, reason) for files that failed in this run."""

    root: str
    index_dir: str
    encoder: str
    indexed: int = 0  # new files embedded (or re-added after removal)
    updated: int = 0  # changed files re-embedded (same id)
    renamed: int = 0  # rows moved to a new path, vector kept
    reused: int = 0  # vectors copied from identical content elsewhere in the gallery
    unchanged: int = 0  # skipped: same size and mtime, or same content hash
    still_failed: int = 0  # failed before, unchanged, not retried
    removed: int = 0  # indexed files that disappeared: tombstoned, vectors removed
    repaired: int = 0  # index entries fixed by reconciliation (orphans removed, missing re-embedded)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: int = 0  # non-image or hidden entries
    unlisted: list[str] = field(default_factory=list)  # directories that could not be listed (files kept)
    total: int = 0  # vectors in the index afterwards
    index_version: int = 0
    index_type: str = "Flat"
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def embedded(self) -> int:
        return self.indexed + self.updated

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


# Crash hook -------------------------------------------------------------------------------------
_crash_counts: collections.Counter = collections.Counter()


def _crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    _crash_counts[name] += 1
    for item in spec.split(","):
        point, _, n = item.partition(":")
        if point == name and _crash_counts[name] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# Public entry points ----------------------------------------------------------------------------
def build_index(folder, index_dir, encoder_spec: str | None = None, *, db_url: str | None = None,
                index_type: str = "auto", options: IngestOptions | None = None, encoder=None,
                root=None) -> IngestReport:
    """Index `folder` into `index_dir` (created). An existing index of the same source and encoder is
    updated instead; anything else there is refused.

    `folder` is a source (index/sources.py): an image folder, "@files.txt" (one path per line), a
    ".parquet" file with a `path` column, or their file:// URIs; `root` is the indexed root of a list
    (default: the deepest directory holding every listed file).
    encoder_spec defaults to encoder.DEFAULT_ENCODER; `encoder` may pass an already loaded one (its
    spec must still be given, to be recorded for later updates and queries).
    """
    from encoder import DEFAULT_ENCODER

    options = options or IngestOptions()
    encoder_spec = embedder.canonical_spec(encoder_spec or DEFAULT_ENCODER)
    parse_factory(index_type)
    source = resolve_source(folder, root)
    root = source.root
    enc = encoder if encoder is not None else embedder.load(encoder_spec, embedder.pick_device(not options.use_gpu))
    layout = IndexDir(index_dir)
    record = None
    if db_url is not None:
        make_engine(db_url).dispose()  # an unusable URL is refused before anything is written
        record = recorded_url(db_url)  # never its password
    with layout.writer_lock():
        if layout.exists():
            config = layout.read_config()
            if db_url is not None and recorded_url(config.get("catalog") or "") != record:
                raise CatalogError(f"{layout.path} already uses the catalog "
                                   f"{safe_url(config['catalog']) if config.get('catalog') else 'inside the directory'}")
            if config["encoder"] != encoder_spec:
                raise EncoderMismatchError(f"{layout.path} is an index for {config['encoder']!r}, not "
                                           f"{encoder_spec!r}: encoders are never mixed; use another --index-dir")
        else:
            if db_url is not None and _catalog_initialised(db_url):
                raise CatalogError(f"the catalog {safe_url(db_url)} already belongs to an index: each index needs "
                                   "a catalog of its own (another --db database)")
            config = layout.write_config(record, os.fsdecode(root), encoder_spec, index_type,
                                         owner=uuid.uuid4().hex, source=source.to_meta())
        catalog = _open_or_create_catalog(layout, config, enc, options, url=db_url)
        try:
            meta = catalog.meta()
            recorded = Source.from_meta(meta)
            if recorded != source:
                raise CatalogError(f"{layout.path} indexes {recorded.describe()}, not {source.describe()}; "
                                   "use another --index-dir")
            catalog.check_encoder(embedder.identity(enc, encoder_spec))
            return _Writer(layout, catalog, enc, options, repair=False, requested=index_type).run()
        finally:
            catalog.close()


def _open_or_create_catalog(layout: IndexDir, config: dict, enc, options: IngestOptions,
                            url: str | None = None) -> Catalog:
    """The directory's catalog (at `url`, else the configured one); created from the configuration when
    it is new, or when a creation was interrupted before the catalog's metadata was committed (the
    configuration is written first)."""
    url = url or layout.catalog_url(config)
    try:
        return layout.open_catalog(read_only=False, config=config, url=url)
    except CatalogError:
        if _catalog_initialised(url):
            raise
    ident = embedder.identity(enc, config["encoder"])
    if ident["lipschitz"] is not None and getattr(enc, "float_error", None) is not None:
        ident["float_error"] = float(enc.float_error)  # certificates' slack (encoder.certify.slack_for)
    return Catalog.create(url, {
        "owner": config.get("owner"),
        "index_dir": str(layout.path),
        "root": config["root"],
        "source": config.get("source") or {"kind": "folder", "list": None},
        "encoder": ident,
        "limits": asdict(options.limits or DecodeLimits()),
        "index": {"version": 0, "rows": 0, "sha256": None, "file": None, "factory": "Flat",
                  "requested": config.get("index_type", "auto"), "params": {}, "dim": ident["dim"]},
    })


def build_cache_index(folder, index_dir, encoder_spec: str, *, encoder, options: IngestOptions | None = None
                      ) -> IngestReport:
    """`build_index` for an index directory that robret owns as a cache (`robret demo`'s, the page's demo
    and comparison indexes): one embedded with other weights under the same spec (a bundled model
    retrained, an upgrade) is deleted and built again, with a warning. A user's index is never
    rebuilt behind their back: `build_index` refuses the mix with EncoderMismatchError."""
    try:
        return build_index(folder, index_dir, encoder_spec, encoder=encoder, options=options)
    except EncoderMismatchError as exc:
        log.warning("%s: %s; rebuilding this cached index", index_dir, exc)
        shutil.rmtree(index_dir)
        return build_index(folder, index_dir, encoder_spec, encoder=encoder, options=options)


def update_index(index_dir, *, options: IngestOptions | None = None, encoder=None) -> IngestReport:
    """Re-scan the folder recorded at build and bring the index up to date (see module doc)."""
    return _open_writer(index_dir, options or IngestOptions(), encoder, repair=False)


def repair_index(index_dir, *, options: IngestOptions | None = None, encoder=None) -> IngestReport:
    """`update_index`, but a missing, unreadable or altered index file is rebuilt (re-embedding
    what it cannot recover) instead of refused."""
    return _open_writer(index_dir, options or IngestOptions(), encoder, repair=True)


def _open_writer(index_dir, options: IngestOptions, encoder, repair: bool) -> IngestReport:
    layout = IndexDir(index_dir)
    config = layout.read_config()
    with layout.writer_lock():
        spec = config["encoder"]
        enc = encoder if encoder is not None else embedder.load(spec, embedder.pick_device(not options.use_gpu))
        catalog = _open_or_create_catalog(layout, config, enc, options)
        try:
            catalog.check_encoder(embedder.identity(enc, spec))
            return _Writer(layout, catalog, enc, options, repair=repair).run()
        finally:
            catalog.close()


def _catalog_initialised(url: str) -> bool:
    """True when a catalog at `url` has committed its metadata (so it must not be re-created)."""
    catalog = Catalog(url)
    try:
        return "schema_version" in catalog.meta()
    except Exception:  # no tables yet
        return False
    finally:
        catalog.close()


# The writer -------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    entry: ScanEntry
    row: dict | None
    kind: str  # failed | touched | known | decoded
    digest: str | None = None
    size: int | None = None
    error: DecodeError | None = None
    tensor: object = None
    vector: object = None  # (dim,) float32 when embedded elsewhere (options.embed_files)
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)


class _Writer:
    """One build/update run over an index directory whose writer lock is held."""

    def __init__(self, layout: IndexDir, catalog: Catalog, encoder, options: IngestOptions, repair: bool,
                 requested: str | None = None):
        self.layout, self.catalog, self.encoder, self.options, self.repair = layout, catalog, encoder, options, repair
        self.meta = catalog.meta()
        self.index_meta = dict(self.meta["index"])
        self.dirty = False  # the in-memory index (or its recorded type) differs from the live file
        if requested is not None and requested != self.index_meta.get("requested"):
            self.index_meta["requested"] = requested  # takes effect at the final checkpoint
            self.dirty = True
        self.version = int(self.index_meta["version"])
        self.limits = options.limits or DecodeLimits(**self.meta.get("limits", {}))
        self.budget = DecodeBudget(options.decode_memory)  # shared by the decode workers
        self.root = os.fsencode(self.meta["root"])
        self.report = IngestReport(root=self.meta["root"], index_dir=str(layout.path), encoder=encoder.name)
        self.pending: dict[int, dict] = {}  # id → full row state to write at the next checkpoint
        self.new_ids: set[int] = set()  # pending ids not yet in the catalog (inserts)
        self.last_checkpoint = time.monotonic()
        self.live = live_files(self.index_meta)  # the committed live set (index/layout.py)
        # Changes since the last checkpoint, what its segment holds: ids added (in order; their vectors are
        # read back from the index at the checkpoint) and committed ids removed (tombstones).
        self.added: dict[int, None] = {}
        self.removed: set[int] = set()
        self.rebuilt = False  # the in-memory index was rebuilt (type change, lost files): a base is due
        # (tombstones, added ids) of the live segments this writer wrote, so that merging them reads nothing
        self.written: dict[str, tuple[list[int], list[int]]] = {}

    # Setup ----------------------------------------------------------------------------------
    def _load_store(self) -> VectorStore:
        try:
            store = load_live_store(self.layout, self.index_meta, self.options.use_gpu)
        except StoreError as exc:
            if not self.repair:
                raise
            reason = re.sub(r";? ?run `robret index repair[^`]*`", "", str(exc))  # (this is that repair)
            self.report.warnings.append(f"index file unusable ({reason}); rebuilding it from the files")
            log.warning("repair: %s; rebuilding", reason)
            store = VectorStore.create(int(self.index_meta["dim"]), "Flat", use_gpu=self.options.use_gpu)
            self.dirty = self.rebuilt = True
        for leftover in self.layout.leftovers(self.index_meta):
            log.info("removing leftover %s from an interrupted write", leftover.name)
            leftover.unlink(missing_ok=True)
        return store

    def _reconcile(self) -> set[int]:
        """Make the in-memory index hold exactly the rows marked indexed. Returns ids to re-embed.

        Cannot be needed after a crash (see the protocol); it catches edits made behind robret's back.
        """
        ids = self.store.ids()
        uniq, counts = np.unique(ids, return_counts=True)
        indexed = {r["id"] for r in self.rows.values() if r["status"] == INDEXED}
        in_store = set(uniq.tolist())
        bad = set(uniq[counts > 1].tolist())
        if self.repair:  # reading every vector back is verify's job; repair acts on what it finds
            for start in range(0, len(uniq), 65536):
                chunk = uniq[start:start + 65536]
                norms = np.linalg.norm(self.store.reconstruct(chunk), axis=1)
                bad |= set(chunk[~(np.abs(norms - 1) <= NORM_TOLERANCE)].tolist())
        orphans = (in_store - indexed) | bad
        if orphans:
            self._remove(sorted(orphans))
            self.rebuilt = True  # a base, not tombstones, for an index that disagreed (e.g. an id stored twice)
        reembed = (indexed - in_store) | (bad & indexed)
        if orphans or reembed:
            msg = f"catalog and index disagreed: {len(orphans)} index entries dropped, {len(reembed)} files to re-embed"
            log.warning("%s", msg)
            self.report.warnings.append(msg)
            self.report.repaired = len(orphans | reembed)
        self.in_store = (in_store - orphans)
        return reembed

    # Run ------------------------------------------------------------------------------------
    def run(self) -> IngestReport:
        t0 = time.monotonic()
        scan = scan_source(Source.from_meta(self.meta), exclude=(self.layout.path,))
        self.report.warnings.extend(scan.warnings)
        self.report.ignored = scan.ignored
        self.report.unlisted = [display_path(p) or "." for p in scan.protected]
        self.rows = {r["id"]: r for r in self.catalog.plan_rows()}
        if not scan.entries and self.rows and not self.options.allow_empty:
            where = self.meta.get("root") or "the indexed folder"
            raise FolderError(f"{where} holds no files now, where the index has {len(self.rows):,} (an unmounted "
                              "drive, or a folder emptied by mistake?): nothing was changed. If the files are gone "
                              "for good, run it again with --allow-empty to remove every item")
        self.by_key = {r["path_key"]: r["id"] for r in self.rows.values()}
        self.next_id = self.catalog.max_id() + 1
        self.store = self._load_store()
        reembed = self._reconcile()
        # hash → id of a vector in the index with that content (what renames and copies reuse)
        self.by_hash: dict[str, int] = {}
        for r in self.rows.values():
            if r["status"] == INDEXED and r["id"] in self.in_store and r["content_hash"]:
                self.by_hash.setdefault(r["content_hash"], r["id"])
        work, seen = self._plan(scan, reembed)
        self.missing = {
            i for i, r in self.rows.items()
            if r["status"] != REMOVED and r["path_key"] not in seen and not _under(r["path_key"], scan.protected)
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            (self._process if self.options.embed_files is None else self._process_elsewhere)(work)
        self._remove_missing()
        self.report.seconds = time.monotonic() - t0
        self._checkpoint(final=True)
        self.report.seconds = time.monotonic() - t0
        self.report.total = self.store.ntotal
        self.report.index_version = self.version
        self.report.index_type = self.store.factory
        self.catalog.set_meta({"last_run": {**self.report.to_dict(), "failed": len(self.report.failed),
                                            "warnings": len(self.report.warnings), "at": utcnow().isoformat()}})
        return self.report

    def _plan(self, scan, reembed: set[int]) -> tuple[list[tuple[ScanEntry, dict | None]], set[bytes]]:
        work, seen = [], set()
        for entry in scan.entries:
            seen.add(entry.key)
            row_id = self.by_key.get(entry.key)
            row = self.rows.get(row_id) if row_id is not None else None
            same_stat = row is not None and row["size"] == entry.size and row["mtime_ns"] == entry.mtime_ns
            if entry.problem is not None:
                # Same kind, same stat: the same problem (its detail may name a process id, e.g. a link
                # into /proc/self, and must not make every update a new version).
                if (row is not None and row["status"] == FAILED and same_stat
                        and (row["reason"] or "").split(":", 1)[0] == entry.problem.kind):
                    self.report.still_failed += 1
                else:
                    self._fail(entry, row, entry.problem)
            elif row is None or row["status"] == REMOVED:
                work.append((entry, row))
            elif row["status"] == INDEXED and same_stat and row["id"] not in reembed:
                self.report.unchanged += 1
            elif row["status"] == FAILED and same_stat and not self.options.retry_failed and not self._transient(row):
                self.report.still_failed += 1
            else:
                work.append((entry, row))
        return work, seen

    def _transient(self, row: dict) -> bool:
        """An object-store read that failed for a reason outside the object (network, throttling): retried at
        every update, as a file whose read failed is not (its failure is the file's until it changes)."""
        return is_remote(self.root) and (row["reason"] or "").startswith("unreadable:")

    def _progress(self, total: int):
        """A tqdm progress bar (images/s on stderr) when asked for, else one that shows nothing."""
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="indexing", dynamic_ncols=True,
                    disable=not (self.options.progress and total))

    def _process(self, work) -> None:
        batch: list[_Loaded] = []
        window = max(1, self.options.workers) * max(1, self.options.batch_size) * 2
        with self._progress(len(work)) as bar:
            with ThreadPoolExecutor(max_workers=max(1, self.options.workers)) as pool:
                pending = collections.deque()
                items = iter(work)
                for entry, row in items:
                    pending.append(pool.submit(self._load, entry, row, True))
                    if len(pending) >= window:
                        break
                while pending:
                    loaded = pending.popleft().result()
                    nxt = next(items, None)
                    if nxt is not None:
                        pending.append(pool.submit(self._load, nxt[0], nxt[1], True))
                    if self._handle(loaded, batch) and len(batch) >= self.options.batch_size:
                        self._flush(batch)
                    bar.update(1)
            self._flush(batch)

    def _process_elsewhere(self, work) -> None:
        """Read and hash here, decode + embed through `options.embed_files`, write here. Results are
        handled in the order of `work` (buffered when they arrive early), so rows, ids and batches come
        out exactly as a local run's; the digest recorded is the one of the bytes actually embedded."""
        with ThreadPoolExecutor(max_workers=max(1, self.options.workers)) as pool:
            loaded = list(pool.map(lambda w: self._load(w[0], w[1], True, decode=False), work))
        remote = [i for i, item in enumerate(loaded) if item.kind == "hashed"]
        results = self.options.embed_files([loaded[i].entry.path for i in remote], self.meta["encoder"], self.limits,
                                           self.root)
        arrived: dict[int, object] = {}
        batch: list[_Loaded] = []
        position = 0
        with self._progress(len(loaded)) as bar:
            for j, result in itertools.chain(results, [(None, None)]):
                if j is not None:
                    arrived[remote[j]] = result
                while position < len(loaded) and (loaded[position].kind != "hashed" or position in arrived):
                    item = loaded[position]
                    result = arrived.pop(position, None)
                    if isinstance(result, DecodeError):
                        item = _Loaded(item.entry, item.row, "failed", error=result)
                    elif result is not None:
                        item = _Loaded(item.entry, item.row, "decoded", result["digest"], result["size"],
                                       vector=result["vector"], width=result["width"], height=result["height"],
                                       notes=item.entry.notes + list(result["notes"]))
                    if self._handle(item, batch) and len(batch) >= self.options.batch_size:
                        self._flush(batch)
                    position += 1
                    bar.update(1)
        if position < len(loaded):
            raise RuntimeError(f"{len(loaded) - position} files were sent to be embedded and never came back")
        self._flush(batch)

    def _load(self, entry: ScanEntry, row: dict | None, allow_reuse: bool, decode: bool = True) -> _Loaded:
        """Worker thread: read, hash, and (unless the content is known) decode and preprocess
        (decode=False: stop after hashing, kind "hashed")."""
        try:
            data = read_bytes(entry.path, self.limits.max_bytes, root=self.root)
            digest = hash_bytes(data)
            if (row is not None and row["status"] == INDEXED and row["content_hash"] == digest
                    and row["id"] in self.in_store):
                return _Loaded(entry, row, "touched", digest, len(data))
            if allow_reuse and digest in self.by_hash:
                return _Loaded(entry, row, "known", digest, len(data))
            if not decode:
                return _Loaded(entry, row, "hashed", digest, len(data))
            with self.budget.reserve(decode_cost(data)):  # bounded decode memory across workers
                tensor, width, height, notes = preprocess_bytes(data, self.limits, self.encoder)
            return _Loaded(entry, row, "decoded", digest, entry.size, tensor=tensor, width=width, height=height,
                           notes=entry.notes + notes)
        except DecodeError as exc:
            return _Loaded(entry, row, "failed", error=exc)

    def _handle(self, loaded: _Loaded, batch: list[_Loaded]) -> bool:
        """Main thread. Returns True when `loaded` joined the embedding batch."""
        entry, row = loaded.entry, loaded.row
        if loaded.kind == "failed":
            self._fail(entry, row, loaded.error)
            return False
        if loaded.kind == "touched":
            self._stage(row["id"], {**row, "size": loaded.size, "mtime_ns": entry.mtime_ns})
            self.report.unchanged += 1
            return False
        source = self.by_hash.get(loaded.digest)
        if source is not None and source != (row or {}).get("id"):
            self._reuse(loaded, source)
            return False
        if loaded.kind == "known":  # its source changed meanwhile: decode after all
            return self._handle(self._load(entry, row, False), batch)
        batch.append(loaded)
        return True

    def _new_row(self, entry: ScanEntry) -> dict:
        row_id = self.next_id
        self.next_id += 1
        row = {"id": row_id, "path_key": entry.key, "path": entry.display, "content_hash": None, "size": None,
               "mtime_ns": None, "width": None, "height": None, "status": FAILED, "reason": None, "notes": None,
               "encoder": None, "embedded_at": None, "created_at": utcnow()}
        self.new_ids.add(row_id)
        self.rows[row_id] = row
        self.by_key[entry.key] = row_id
        return row

    def _stage(self, row_id: int, state: dict) -> None:
        state = dict(state)
        state["updated_at"] = utcnow()
        self.rows[row_id] = state
        self.pending[row_id] = state

    def _drop_vector(self, row: dict | None) -> None:
        """Remove a row's current vector (if any) from the index and from the hash lookup."""
        if row is None or row["id"] not in self.in_store:
            return
        self._remove([row["id"]])
        self.in_store.discard(row["id"])
        if row["content_hash"] and self.by_hash.get(row["content_hash"]) == row["id"]:
            del self.by_hash[row["content_hash"]]

    def _fail(self, entry: ScanEntry, row: dict | None, error: DecodeError) -> None:
        log.warning("%s: %s", entry.display, error.reason)
        self.report.failed.append((entry.display, error.reason))
        self._drop_vector(row)
        row = row if row is not None else self._new_row(entry)
        self._stage(row["id"], {**row, "status": FAILED, "reason": error.reason, "size": entry.size,
                                "mtime_ns": entry.mtime_ns, "content_hash": None, "width": None, "height": None,
                                "notes": "; ".join(entry.notes) or None})

    def _reuse(self, loaded: _Loaded, source: int) -> None:
        entry, row = loaded.entry, loaded.row
        src = self.rows[source]
        common = {"content_hash": loaded.digest, "size": loaded.size, "mtime_ns": entry.mtime_ns,
                  "width": src["width"], "height": src["height"], "status": INDEXED, "reason": None,
                  "notes": src["notes"], "encoder": src["encoder"], "embedded_at": src["embedded_at"]}
        if row is None and source in self.missing:
            # A rename: the row (and its id and vector) moves to the new path.
            self.missing.discard(source)
            del self.by_key[src["path_key"]]
            self.by_key[entry.key] = source
            self._stage(source, {**src, **common, "path_key": entry.key, "path": entry.display})
            self.report.renamed += 1
            return
        vector = self.store.reconstruct([source])
        self._drop_vector(row)
        row = row if row is not None else self._new_row(entry)
        self._add([row["id"]], vector)
        self.in_store.add(row["id"])
        self._stage(row["id"], {**row, **common})
        self.report.reused += 1

    def _flush(self, batch: list[_Loaded]) -> None:
        if not batch:
            return
        local = [b for b in batch if b.vector is None]
        if local:
            t = time.monotonic()
            for b, v in zip(local, embedder.embed_inputs(self.encoder, [b.tensor for b in local])):
                b.vector = v
            self.report.embed_seconds += time.monotonic() - t
        vectors = np.stack([b.vector for b in batch])
        ids, now = [], utcnow()
        for loaded in batch:
            row = loaded.row
            if row is not None and row["status"] == INDEXED:
                self.report.updated += 1
            else:
                self.report.indexed += 1
            self._drop_vector(row)
            row = row if row is not None else self._new_row(loaded.entry)
            ids.append(row["id"])
            self._stage(row["id"], {**row, "status": INDEXED, "reason": None, "content_hash": loaded.digest,
                                    "size": loaded.size, "mtime_ns": loaded.entry.mtime_ns, "width": loaded.width,
                                    "height": loaded.height, "notes": "; ".join(loaded.notes) or None,
                                    "encoder": self.encoder.name, "embedded_at": now})
            self.by_hash.setdefault(loaded.digest, row["id"])
        self._add(ids, vectors)
        self.in_store.update(ids)
        batch.clear()
        _crash_point("batch")
        if time.monotonic() - self.last_checkpoint >= self.options.checkpoint_seconds:
            self._checkpoint(final=False)

    def _remove_missing(self) -> None:
        for row_id in sorted(self.missing):
            row = self.rows[row_id]
            if row["status"] == INDEXED:
                self.report.removed += 1
                log.info("%s: removed (file no longer present)", row["path"])
            self._drop_vector(row)
            self._stage(row_id, {**row, "status": REMOVED})

    # Changes to the index, recorded for the next segment ---------------------------------------
    def _add(self, ids, vectors) -> None:
        self.store.add(ids, vectors)
        self.added.update(dict.fromkeys(int(i) for i in ids))
        self.dirty = True

    def _remove(self, ids) -> None:
        """Remove stored ids. An id added since the last checkpoint simply leaves the next segment; any
        other id is committed (an id is stored at most once, so a re-added id had its committed vector
        removed first): it becomes a tombstone, applied before the segment's rows at open."""
        self.store.remove(ids)
        for i in ids:
            i = int(i)
            if i in self.added:
                del self.added[i]
            else:
                self.removed.add(i)
        if self.store.kind == "hnsw":
            self.rebuilt = True  # VectorStore.remove rebuilt the graph: save it rather than redo it at open
        self.dirty = True

    # Checkpoint -----------------------------------------------------------------------------
    def _base_due(self, final: bool) -> bool:
        """Whether this checkpoint writes one base (the whole index) rather than a segment (module doc)."""
        segments = sum(f["kind"] == ROWS for f in self.live)
        if self.rebuilt:
            return True
        if final and self.repair:  # repair leaves one verified base behind
            return not (len(self.live) == 1 and self.live[0]["kind"] == BASE) or bool(self.added or self.removed)
        if not (self.added or self.removed):
            return False
        limit = self.options.compact_segments
        return not self.live or (limit is not None and segments >= limit)

    def _merge_start(self) -> int:
        """The position in the live set from which files are merged into this checkpoint's segment
        (len(live): none; 0: all of them, that is a base). Size-tiered, like a binary counter: starting
        from this checkpoint's own segment size w, the newest remaining file is taken in while its size
        is at most w, and w grows by its size.

        Cost: a file is only ever merged into a file at least twice its size, so a row, each time it is
        rewritten, lands in a file at least twice as large as the one it left; files are bounded by the
        index's size S, so a row is rewritten at most log2(S / its first segment's size) + 1 times, and a
        build of n rows in checkpoints of b rows writes O(n·log(n/b)) bytes in all (rewriting the whole
        index every c checkpoints writes O(n²/(c·b))). The live set then holds O(log(n/b)) files, sizes
        roughly halving from oldest to newest."""
        if not self.options.merge_tiers or self.options.compact_segments is None:
            return len(self.live)
        weight = segment_bytes(self.store.dim, len(self.removed), len(self.added))
        start = len(self.live)
        while start > 0 and self._file_bytes(self.live[start - 1]) <= weight:
            start -= 1
            weight += self._file_bytes(self.live[start])
        return start

    def _file_bytes(self, f: dict) -> int:
        """A live file's size as recorded (an index written before segments recorded none: its file's)."""
        return int(f["bytes"]) if "bytes" in f else (self.layout.path / f["name"]).stat().st_size

    def _merged_changes(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(tombstones, added ids) of one segment equal to the live segments from `start` on followed by
        this checkpoint's changes, applied to the state the files before `start` leave.

        Replaying the segments in order with A = ids whose current vector comes from them and R = ids of
        that earlier state they removed: a tombstone of an id in A drops it from A (it was added after that
        state; if the state also held it, R already has it), any other tombstone goes to R (the load check
        of every segment made it hit a stored id of that state); an added id joins A. Applied to that
        state, "remove R, then add A with their current vectors" gives the current state: ids of the state
        not in R are untouched by every segment, and each id in A holds the vector of its last addition."""
        added: dict[int, None] = {}
        removed: set[int] = set()
        changes = [self._segment_changes(f) for f in self.live[start:]]
        changes.append((sorted(self.removed), list(self.added)))
        for tombstones, ids in changes:
            for i in tombstones:
                if i in added:
                    del added[i]
                else:
                    removed.add(i)
            for i in ids:
                added[i] = None
        return np.array(sorted(removed), np.int64), np.fromiter(added, np.int64, len(added))

    def _segment_changes(self, f: dict) -> tuple[list[int], list[int]]:
        """(tombstones, added ids) of a live segment: as this writer wrote it, else read back checked
        against its recorded SHA-256 (a segment of an earlier run)."""
        if f["name"] in self.written:
            return self.written[f["name"]]
        if f["kind"] != ROWS:
            raise StoreError(f"cannot merge {f['name']}: not a segment")
        seg = read_segment(self.layout.path / f["name"], self.store.dim, f["sha256"])
        return seg.removed.tolist(), seg.ids.tolist()

    def _checkpoint(self, final: bool) -> None:
        requested = self.index_meta.get("requested", "auto")
        if final:
            target = target_factory(requested, self.store.factory, self.store.ntotal)
            kind, nlist = parse_factory(requested)
            if kind == "ivf" and parse_factory(target)[0] == "flat":
                self.report.warnings.append(
                    f"the index stays Flat (exact search) until it holds {nlist * IVF_MIN_POINTS_PER_LIST:,} vectors, "
                    f"enough to train {requested}'s {nlist:,} lists (it holds {self.store.ntotal:,})")
            if target != self.store.factory:
                log.info("converting the index from %s to %s", self.store.factory, target)
                self.store = self.store.rebuild(target)
                self.dirty = self.rebuilt = True
        base = self._base_due(final)
        start = len(self.live) if base or not (self.added or self.removed) else self._merge_start()
        base = base or start == 0  # the tiered merge reached the first file: the whole index
        if not self.dirty and not self.pending and self.version > 0 and not base:
            return
        version = self.version + 1
        if base:
            live = [_write_base(self.layout, self.store, version)]
        elif self.added or self.removed:
            removed, ids = self._merged_changes(start)
            path = self.layout.segment_file(version)
            digest, size = write_segment(path, self.store.dim, removed, ids, self.store.reconstruct(ids),
                                         midway=lambda: _crash_point("segment"),
                                         before_replace=lambda _tmp: _crash_point("write"))
            _crash_point("rename")
            live = self.live[:start] + [{"name": path.name, "kind": ROWS, "sha256": digest, "rows": len(ids),
                                         "removed": len(removed), "version": version, "bytes": size}]
            self.written[path.name] = (removed.tolist(), ids.tolist())
        else:  # only catalog rows changed (failures, refreshed mtimes): the same live set
            live = self.live
        index_meta = _version_meta(self.index_meta, self.store, version, live, ids_digest(np.sort(self.store.ids())))
        inserts = [self.pending[i] for i in sorted(self.new_ids)]
        updates = [{k: v for k, v in self.pending[i].items() if k != "created_at"}
                   for i in sorted(self.pending) if i not in self.new_ids]
        for row in inserts:
            row.setdefault("created_at", row["updated_at"])
        self.catalog.commit_changes(inserts, updates, {"index": index_meta, "schema_version": SCHEMA_VERSION})
        _crash_point("commit")
        self.version, self.index_meta, self.live = version, index_meta, live
        names = {f["name"] for f in live}
        self.written = {name: changes for name, changes in self.written.items() if name in names}
        self.pending.clear()
        self.new_ids.clear()
        self.added.clear()
        self.removed.clear()
        self.dirty = self.rebuilt = False
        self.last_checkpoint = time.monotonic()
        for leftover in self.layout.leftovers(index_meta):
            leftover.unlink(missing_ok=True)


def _write_base(layout: IndexDir, store: VectorStore, version: int, crash: str = "") -> dict:
    """Write `store` whole as the base of `version` (temporary file, fsync, rename, directory fsync; crash
    points `<crash>write` and `<crash>rename`); returns its live-set entry."""
    path = layout.index_file(version)
    digest = store.write(path, before_replace=lambda _tmp: _crash_point(crash + "write"))
    _crash_point(crash + "rename")
    return {"name": path.name, "kind": BASE, "sha256": digest, "rows": store.ntotal, "version": version,
            "bytes": path.stat().st_size}


def _version_meta(index_meta: dict, store: VectorStore, version: int, live: list[dict], ids_sha256: str) -> dict:
    """The catalog's `index` record of a new version whose live set is `live` and whose index is `store`
    (`sha256`/`file` repeat the base's, for readers of single-file indexes)."""
    first = live[0] if live and live[0]["kind"] == BASE else None
    return {**index_meta, "version": version, "rows": store.ntotal, "sha256": first and first["sha256"],
            "file": first and first["name"], "segments": live, "ids_sha256": ids_sha256,
            "factory": store.factory, "params": store.params}


def compact_index(index_dir, *, use_gpu: bool = False) -> dict:
    """Merge an index directory's live set (a base and segments) into one base file (`robret index compact`).

    The same protocol as a checkpoint, without row changes: the live set is loaded and checked (checksums,
    row counts, and the ids digest recorded with the version: IntegrityError naming repair otherwise),
    written whole to `vectors.<v+1>.faiss` (temporary file, fsync, rename, directory fsync), then ONE
    catalog commit names it alone as version v+1; the files it replaces are deleted only after that commit.
    Killed at any moment, the catalog names either the old live set (intact) or the new base (complete).
    Returns {"version_before", "version", "files_before", "bytes_before", "bytes", "rows", "seconds"}.
    """
    t0 = time.monotonic()
    layout = IndexDir(index_dir)
    config = layout.read_config()
    with layout.writer_lock():
        catalog = layout.open_catalog(read_only=False, config=config)
        try:
            index_meta = catalog.meta()["index"]
            before = live_files(index_meta)
            store = load_live_store(layout, index_meta, use_gpu=use_gpu)
            recorded, ids_sha256 = index_meta.get("ids_sha256"), ids_digest(np.sort(store.ids()))
            if recorded is not None and ids_sha256 != recorded:
                raise IntegrityError("the live index files do not hold the ids committed with version "
                                     f"{index_meta['version']}; run `robret index repair --index-dir {layout.path}`")
            for leftover in layout.leftovers(index_meta):
                leftover.unlink(missing_ok=True)
            out = {"version_before": int(index_meta["version"]), "files_before": len(before),
                   "bytes_before": sum((layout.path / f["name"]).stat().st_size for f in before),
                   "rows": store.ntotal}
            if len(before) <= 1 and all(f["kind"] == BASE for f in before):
                return {**out, "version": out["version_before"], "bytes": out["bytes_before"],
                        "seconds": time.monotonic() - t0}
            version = int(index_meta["version"]) + 1
            base = _write_base(layout, store, version, crash="compact-")
            new_meta = _version_meta(index_meta, store, version, [base], ids_sha256)
            catalog.commit_changes([], [], {"index": new_meta, "schema_version": SCHEMA_VERSION})
            _crash_point("compact-commit")
            for leftover in layout.leftovers(new_meta):
                leftover.unlink(missing_ok=True)
            return {**out, "version": version, "bytes": base["bytes"], "seconds": time.monotonic() - t0}
        finally:
            catalog.close()


def preprocess_bytes(data: bytes, limits: DecodeLimits, encoder) -> tuple[object, int, int, list[str]]:
    """A file's bytes → (encoder input tensor, displayed width, height, notes); DecodeError with a reason."""
    image, notes, _ = decode_bytes(data, limits)
    width, height = oriented_size(image)
    check_shape(width, height, limits)
    try:
        tensor = encoder.preprocess(image)
    except Exception as exc:  # a conversion PIL/torch cannot do is this file's problem only
        raise DecodeError("corrupt", f"preprocessing failed ({type(exc).__name__}: {exc})") from None
    return tensor, width, height, notes


def _under(key: bytes, prefixes: list[bytes]) -> bool:
    return any(p == b"" or key.startswith(p + b"/") for p in prefixes)

