"""Queries in bulk: many images, folders, lists and indexed ids against one gallery (`robret query`).

    sources = expand_sources(["a.jpg", "holiday/", "@todo.txt"], ids=[42])
    for outcome in run_queries(gallery, sources, k=10, exclude_self=True):
        outcome.ok, outcome.result, outcome.error, outcome.document(gallery, relative=True)

What a query can be:
    FILE        an image file (any name: what you give is what is read)
    FOLDER      every image under it, recursively, with the extensions indexing uses
                (`encoder.image.IMAGE_EXTENSIONS`), in the order and with the checks of `index.scan.scan_folder`
                (symlinks leaving the folder, FIFOs, loops: reported per file, never opened)
    @LIST       a text file naming one FILE, FOLDER or @LIST per line (blank lines and lines starting with #
                skipped; relative names are relative to the list's own folder, as in `robret index build @LIST`;
                a list that names itself, directly or not, is refused)
    id N        an indexed item, queried by its stored vector: the file is not read again. Its radii are
                stated at the encoder input (the stored vector carries no record of the file's channel
                layout); give the file itself to state them over its own samples.

The encoder and the index load once (the gallery's). Files are decoded and reduced to the encoder's
input (`search.reduce_query`) by a small thread pool one batch ahead of the encoder, which embeds a batch per
call (`search_images`); each query is then searched and certified on its own, exactly as `search_image` would
(the same numbers: tests check it). A file that cannot be read or decoded becomes an outcome with an error
(`kind`, `detail`) and the batch goes on.

Memory: a decoded image lives only until it is reduced (a 64-megapixel PNG: 256 MB as Pillow stores it, then
a 0.6 MB input). `load_ahead` does this for the first batch before torch and FAISS are loaded (`robret query`
calls it with the catalog's facts before opening the gallery), so that one large query's peak is the larger
of "decoded image" and "libraries + model", not their sum; later batches are decoded while those libraries
are loaded. Across worker threads the decoded images are bounded by a decode budget (`QueryReader`), as in
a build (`encoder.image.DecodeBudget`, `decode_cost`).

`exclude_self`: hits whose content (SHA-256 of the file's bytes) equals the query's are left out of the
answer and of its certificate (`search_embedding`'s `exclude`): a query taken from the gallery, or an
exact copy of a gallery file, does not find itself first.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

from encoder.image import DecodeBudget, decode_cost
from index.decode import DecodeError, DecodeLimits, decode_image, read_bytes
from index.errors import FolderError, StoreError
from index.layout import IndexDir
from index.scan import scan_folder, shown_path

from .schema import SCHEMA_VERSION
from .search import SearchResult, reduce_query, result_document, search_embedding, search_images

__all__ = ["QuerySource", "QueryOutcome", "QueryReader", "expand_sources", "load_ahead", "run_queries",
           "relative_path", "summary", "DEFAULT_BATCH", "DECODE_MEMORY"]

log = logging.getLogger(__name__)
DEFAULT_BATCH = 16  # images per encoder call
DECODE_MEMORY = 512 * 2**20  # bytes of decoded images held at once across query workers (as a build's default)


@dataclass(frozen=True)
class QuerySource:
    """One query: a file to read, or an indexed id (its stored vector)."""

    label: str  # how the user named it: the path as given (folder entries joined to the folder), or "id:N"
    path: str | bytes | None = None  # the file to read (bytes for names that are not UTF-8)
    id: int | None = None  # an indexed item, queried by its stored vector
    problem: DecodeError | None = None  # known before reading (from the folder scan): never opened


@dataclass
class QueryOutcome:
    """What one query gave: a result, or an error (kind, detail); never both."""

    source: QuerySource
    result: SearchResult | None = None
    content_hash: str | None = None  # SHA-256 hex of the query file's bytes (or the indexed item's)
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def query(self) -> dict:
        """The `query` object of the JSON document (docs/json.md)."""
        path = self.source.path
        if path is not None:
            path = shown_path(os.path.abspath(os.fsdecode(path)))
        return {"source": self.source.label, "path": path, "id": self.source.id, "sha256": self.content_hash}

    def document(self, gallery, relative: bool = False) -> dict:
        """This query's JSON document (`search.result_document`), or `{query, error}` for a failure.

        relative: hit paths relative to the indexed root (a path outside it stays absolute)."""
        if not self.ok:
            return {"schema": SCHEMA_VERSION, "query": self.query(),
                    "error": {"kind": self.error_kind, "detail": self.error}}
        doc = result_document(self.result, self.query(), gallery)
        if relative:
            for hit in doc["hits"]:
                hit["path"] = relative_path(hit["path"], gallery.root)
        return doc


def relative_path(path: str | os.PathLike | None, root: str | os.PathLike) -> str | None:
    """`path` relative to `root` when it lies inside it (the catalog's relative path), else unchanged."""
    if path is None:
        return None
    rel = os.path.relpath(os.fspath(path), os.fspath(root))
    return os.fspath(path) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def expand_sources(items: Iterable[str], ids: Iterable[int] = (), *, base: str = "",
                   lists: tuple[str, ...] = ()) -> list[QuerySource]:
    """Command-line query names (FILE, FOLDER, @LIST; module docstring) and ids → one source per query.

    base: the folder relative names are read from ("": the current directory; a list's entries: the list's
    folder); lists: the real paths of the lists being expanded (a list naming one of them is refused).
    Raises ValueError for a list file that cannot be read or that names itself, FolderError (a GalleryError) for a
    folder that cannot be listed. A FILE that does not exist is a query with the error `missing`; any other
    problem with it is found when it is read (the query's own outcome)."""
    out: list[QuerySource] = []
    for item in items:
        if item.startswith("@") and len(item) > 1:
            path = os.path.join(base, item[1:])
            real = os.path.realpath(path)
            if real in lists:
                raise ValueError(f"the query list {path!r} names itself (through {' → '.join(lists)})")
            out.extend(expand_sources(_read_list(path), base=os.path.dirname(path), lists=(*lists, real)))
            continue
        path = os.path.join(base, item)
        if os.path.isdir(path):
            result = scan_folder(path)
            for entry in result.entries:
                out.append(QuerySource(label=os.path.join(path, entry.display), path=entry.path,
                                       problem=entry.problem))
            for warning in result.warnings:
                log.warning("%s", warning)
        elif not os.path.lexists(path):
            out.append(QuerySource(label=shown_path(path), path=path, problem=DecodeError("missing", "no such file")))
        else:
            out.append(QuerySource(label=shown_path(path), path=path))
    out.extend(QuerySource(label=f"id:{int(i)}", id=int(i)) for i in ids)
    return out


def _read_list(path: str) -> list[str]:
    """A query list's entries: `index.sources.read_entries` (the reader of `robret index build @LIST`), without
    the lines starting with #, and stripped."""
    from index.sources import read_entries

    try:
        lines = read_entries("list", path)
    except FolderError as exc:
        raise ValueError(str(exc)) from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class QueryReader:
    """How one gallery's query files are read: its decode limits, its encoder's input side (None: unknown,
    the samples are kept for the encoder), and the decode budget its worker threads share."""

    limits: DecodeLimits
    input_size: int | None
    budget: DecodeBudget

    @classmethod
    def for_meta(cls, meta: dict, decode_memory: int = DECODE_MEMORY) -> "QueryReader":
        """From a catalog's metadata (`Gallery.meta`, `Catalog.meta()`)."""
        size = (meta.get("encoder") or {}).get("input_size")
        return cls(DecodeLimits(**meta.get("limits", {})), int(size) if size else None, DecodeBudget(decode_memory))

    @classmethod
    def for_index(cls, index_dir, decode_memory: int = DECODE_MEMORY) -> "QueryReader":
        """From an index directory's catalog, read without loading its index file, torch or FAISS."""
        catalog = IndexDir(index_dir).open_catalog()
        try:
            return cls.for_meta(catalog.meta(), decode_memory)
        finally:
            catalog.close()

    def load(self, source: QuerySource):
        """Read, decode and reduce one file query (any thread; no torch): (PreparedQuery, content hash), or a
        QueryOutcome with the error. The decoded image is freed before this returns (large images) or kept
        inside the PreparedQuery (small ones, `reduce_query`)."""
        if source.problem is not None:
            return QueryOutcome(source, error_kind=source.problem.kind, error=source.problem.detail)
        try:
            data = read_bytes(source.path, self.limits.max_bytes)
            with self.budget.reserve(decode_cost(data)):  # bounded decode memory across workers
                decoded = decode_image(data, self.limits)
                del data
                digest = decoded.content_hash
                prepared = reduce_query(decoded.image, self.input_size)
                del decoded
            return prepared, digest
        except DecodeError as exc:
            return QueryOutcome(source, error_kind=exc.kind, error=exc.detail)
        except (OSError, ValueError) as exc:
            return QueryOutcome(source, error_kind="unreadable", error=str(exc))


def load_ahead(reader: QueryReader, sources: list[QuerySource], batch_size: int = DEFAULT_BATCH,
               workers: int | None = None) -> list:
    """The first batch of `run_queries` read in advance (`QueryReader.load` in worker threads, within the
    reader's decode budget), for its `loaded_ahead`: call it before loading the gallery's libraries (module
    docstring)."""
    with ThreadPoolExecutor(max_workers=_workers(workers), thread_name_prefix="robret-query") as pool:
        return list(pool.map(lambda s: None if s.path is None else reader.load(s), sources[:max(1, int(batch_size))]))


def _workers(workers: int | None) -> int:
    return workers or min(4, os.cpu_count() or 1)


def _by_id(gallery, source: QuerySource, k: int, certify: bool, eps, candidates, exclude_self: bool,
           probe_budget: int | None = None) -> QueryOutcome:
    rec = gallery.records([source.id])[0]
    try:
        vector = gallery.vectors([source.id])[0] if rec is not None else None
    except StoreError:
        vector = None
    if rec is None or vector is None:
        return QueryOutcome(source, error_kind="unknown_id", error=f"no indexed item with id {source.id}")
    exclude = gallery.same_content(rec.content_hash) if (exclude_self and rec.content_hash) else ()
    if exclude_self and source.id not in exclude:
        exclude = [*exclude, source.id]
    result = search_embedding(gallery, vector, k, certify=certify, eps=eps, candidates=candidates, exclude=exclude,
                              probe_budget=probe_budget)
    result.query_size = (rec.height, rec.width) if rec.height and rec.width else None
    if result.set_radius is not None:
        result.notes.append("queried by its stored vector: radii are at the encoder input; query the file "
                            "itself to state them over its own samples")
    return QueryOutcome(QuerySource(source.label, path=gallery.path(source.id), id=source.id), result,
                        content_hash=rec.content_hash)


QUANTIZE_QUERIES = 25  # a run of at least this many certified queries builds int8 codes (large galleries)


def run_queries(gallery, sources: Iterable[QuerySource], k: int = 10, *, certify: bool = True,
                eps: float | None = None, candidates: int | None = None, exclude_self: bool = False,
                batch_size: int = DEFAULT_BATCH, workers: int | None = None,
                probe_budget: int | None = None, reader: QueryReader | None = None,
                loaded_ahead: list | None = None) -> Iterator[QueryOutcome]:
    """One outcome per source, in order, each as soon as its batch is done (module docstring).

    Every result is the one `search_image(gallery, file, k, eps=, candidates=, exclude=)` gives (with
    `exclude` = the ids of indexed files with the query's content when `exclude_self`), or, for an id,
    `search_embedding` on its stored vector. reader: how files are read (default: from the gallery's
    metadata); loaded_ahead: the first batch as `load_ahead` read it with that reader.
    """
    sources = list(sources)
    batch_size = max(1, int(batch_size))
    reader = reader or QueryReader.for_meta(gallery.meta)
    chunks = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
    if loaded_ahead is not None and (not chunks or len(loaded_ahead) != len(chunks[0])):
        raise ValueError(f"loaded_ahead holds {len(loaded_ahead)} queries for a first batch of "
                         f"{len(chunks[0]) if chunks else 0}")
    if any(s.path is not None for s in sources):
        gallery.encoder  # noqa: B018 — load it here, once, before worker threads read files
    if certify and len(sources) >= QUANTIZE_QUERIES:
        gallery.prepare_search(background=True)  # int8 codes (or the GPU copy) for the certified queries once built

    def submit(chunk):
        return [None if s.path is None else pool.submit(reader.load, s) for s in chunk]

    with ThreadPoolExecutor(max_workers=_workers(workers), thread_name_prefix="robret-query") as pool:
        pending = (loaded_ahead if loaded_ahead is not None else submit(chunks[0])) if chunks else []
        loaded_ahead = None  # held by `pending` only, so that it is freed with its batch
        for n, chunk in enumerate(chunks):
            loaded = [f.result() if isinstance(f, Future) else f for f in pending]
            pending = submit(chunks[n + 1]) if n + 1 < len(chunks) else []  # decode ahead while this batch runs
            images = [(i, got) for i, got in enumerate(loaded) if isinstance(got, tuple)]
            excludes = [gallery.same_content(digest) if exclude_self else () for _, (_, digest) in images]
            results = search_images(gallery, [px for _, (px, _) in images], k, certify=certify, eps=eps,
                                    candidates=candidates, exclude=excludes, probe_budget=probe_budget) if images else []
            found = {i: QueryOutcome(chunk[i], res, content_hash=digest)
                     for (i, (_, digest)), res in zip(images, results)}
            for i, source in enumerate(chunk):
                if source.path is None:
                    yield _by_id(gallery, source, k, certify, eps, candidates, exclude_self, probe_budget)
                elif i in found:
                    yield found[i]
                else:
                    yield loaded[i]


def summary(outcomes: list[QueryOutcome]) -> dict:
    """Counts for a batch: queries, failed, and failures by kind."""
    kinds: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            kinds[o.error_kind] = kinds.get(o.error_kind, 0) + 1
    return {"queries": len(outcomes), "failed": sum(kinds.values()), "failures": kinds}


