"""The certified search service: an ASGI app (FastAPI) over one index directory, served by uvicorn.

    app = create_app("photos-index/", ServeConfig(token="…"))     # `robret serve` runs it with uvicorn

    POST /search          multipart: `file` (an image upload) or `id` (an indexed id); k, eps, exclude_self
                          → the JSON of `robret query --json` (SearchResult.to_dict + query, encoder)
    POST /search/batch    multipart: any number of `files` and `ids` → {"results": [...]} (one error per item)
    GET  /items/{id}      catalog metadata and a JPEG thumbnail (base64) of an indexed file
    GET  /healthz         liveness, index version and size (no token needed)
    GET  /stats           index facts (`index_stats`) and service counters
    GET  /docs, /openapi.json   published by the framework

Safety: the request body is counted while it is read and refused (413) once it exceeds
`max_body_bytes` (FastAPI's `max_body_size`: a larger Content-Length is refused before anything is read); the pixel count is
checked from the image header before decoding (`encoder.image.decode_bytes`); decoded memory across
concurrent requests is bounded (`DecodeBudget`); each request has a deadline (504); nothing in a
request names a file: only ids of indexed files reach the file system, through the gallery's own read
path, and only when the file still resolves inside the indexed root. A bearer token, when configured,
is required on every route except /healthz. CORS is off unless origins are configured.

Reloading: before each request the catalog's committed index version is compared with the open one;
on a change the gallery is re-opened (Gallery.open loads exactly the committed version, retrying while
a writer swaps files) with the already loaded encoder, so the model loads once per process.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from encoder.image import DecodeBudget, DecodeError, DecodeLimits, check_shape, decode_bytes, decode_cost, oriented_size
from index import INDEXED, EncoderMismatchError, FileRecord, Gallery, index_stats, record_dict
from index.scan import shown_path
from retrieval.search import result_document, search_image

__all__ = ["ServeConfig", "GalleryHolder", "create_app", "is_loopback"]

log = logging.getLogger(__name__)

# Decode failures that mean "too big" (413); every other kind is an unusable image (422).
_TOO_BIG = {"too_large", "too_many_pixels"}


@dataclass(frozen=True)
class ServeConfig:
    """How the service answers (none of this changes a result or its certificate)."""

    token: str | None = None  # bearer token required on every route but /healthz (None: no auth)
    max_body_bytes: int = 32 * 2**20  # largest request body (an upload, or a whole batch)
    max_pixels: int | None = None  # pixel limit of an upload (None: the limit recorded in the index)
    request_timeout: float = 60.0  # seconds before a request is answered 504
    max_batch: int = 32  # queries per /search/batch request
    max_k: int = 1000  # largest k accepted
    concurrency: int = 2  # searches embedding at once (the rest wait for a slot)
    decode_memory: int = 512 * 2**20  # bytes of decoded pixels held at once across requests
    cors_origins: tuple[str, ...] = ()  # allowed browser origins (empty: CORS off)
    use_gpu: bool = True  # search on the GPU when one is visible (torch's; an IVF gallery FAISS's when it sees it)
    thumbnail_side: int = 128  # longest side of /items thumbnails (pixels)
    codes: bool = True  # build int8 codes for certified queries (large galleries; Gallery.prepare_search)


def _codes_state(gallery, config: ServeConfig) -> dict:
    """The int8 codes certified queries scan (`Gallery.prepare_search`): "ready" (with their memory, and "reused" and
    "shared_bytes": the rows whose codes this version shares with the previous version's at a reload, and the bytes
    of those arrays, held once for both), "building" (on a GPU: its copy being made), "off"
    (--no-codes) or "not used" (a gallery too small, an encoder without a Lipschitz bound, or one searched on a
    GPU)."""
    codes = gallery.quantized
    if codes is not None:
        return {"state": "ready", "vectors": len(codes), "bytes": codes.nbytes, "reused": codes.reused,
                "shared_bytes": codes.shared_bytes}
    if not config.codes:
        return {"state": "off"}
    return {"state": "building" if gallery.quantizing else "not used"}


def _gpu_state(gallery, config: ServeConfig) -> dict:
    """Where searches run (`index.gpu_scan.GpuCopy`): "ready" (on torch's GPU: the rows copied, their bytes, and
    "shared_rows" and "shared_bytes", those shared with the previous version's copy at a reload), "copying" (being made: the CPU
    meanwhile), "failed" (with why: the CPU from then on), "off" (--cpu) or "none" (no GPU that torch sees, or a
    gallery FAISS searches: an IVF gallery on FAISS's GPU)."""
    from index.gpu_scan import NO_DEVICE

    if not config.use_gpu:
        return {"state": "off"}
    gpu = getattr(gallery.store, "gpu", None)
    if gpu is None or gpu.why == NO_DEVICE:
        return {"state": "none"}
    if gpu.failed:
        return {"state": "failed", "why": gpu.why}
    copy = gpu.copy
    if copy is None:
        return {"state": "copying" if gallery.quantizing else "not made"}
    return {"state": "ready", "rows": copy.n, "bytes": copy.nbytes, "shared_rows": copy.reused,
            "shared_bytes": copy.shared_bytes}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GalleryHolder:
    """The open gallery, re-opened when the catalog commits a new index version (encoder kept)."""

    def __init__(self, index_dir, *, encoder=None, use_gpu: bool = True, codes: bool = True):
        self.index_dir = index_dir
        self.use_gpu, self.codes = use_gpu, codes
        self._lock = threading.Lock()
        self._gallery = Gallery.open(index_dir, encoder=encoder, use_gpu=use_gpu)
        # int8 codes for certified queries (large galleries), or the GPU copy (codes or not): on a daemon thread
        self._gallery.prepare_search(background=True, codes=codes)
        self.reloads = 0

    def current(self) -> Gallery:
        """The gallery of the committed version (re-opened if a writer committed a newer one)."""
        g = self._gallery
        if int(g.catalog.meta()["index"]["version"]) == g.version:
            return g
        with self._lock:
            g = self._gallery
            if int(g.catalog.meta()["index"]["version"]) != g.version:
                try:
                    new = Gallery.open(self.index_dir, encoder=g.encoder, use_gpu=self.use_gpu)
                except EncoderMismatchError:  # rebuilt with another encoder: load that one
                    new = Gallery.open(self.index_dir, use_gpu=self.use_gpu)
                # (what the older version's codes or GPU copy hold of the files both versions share is reused)
                new.prepare_search(background=True, previous=g, codes=self.codes)
                log.info("index version %d → %d: re-opened", g.version, new.version)
                # Requests still holding the old gallery keep working: its vectors stay mapped (or in
                # memory) until the last of them drops it, and disposing its catalog engine leaves
                # checked-out connections alone.
                g.close(keep_vectors=True)
                self._gallery = g = new
                self.reloads += 1
            return g

    def close(self) -> None:
        self._gallery.close()


@dataclass
class _Counters:
    started: float = field(default_factory=time.time)
    requests: int = 0
    searches: int = 0
    by_status: dict = field(default_factory=dict)

    def count(self, status: int) -> None:
        self.requests += 1
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1


# ASGI middleware ---------------------------------------------------------------------------------
class _Guard:
    """Bearer token, deadline, counters. (The body size limit is the framework's `max_body_size`.)"""

    def __init__(self, app, config: ServeConfig, counters: _Counters):
        self.app, self.config, self.counters = app, config, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counters.count(int(message["status"]))
            await send(message)

        async def reply(status: int, detail: str, extra_headers=()):
            await JSONResponse({"detail": detail}, status, headers=dict(extra_headers))(scope, receive, tracked_send)

        if self.config.token is not None and scope["path"] != "/healthz" and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            expected = f"Bearer {self.config.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return await reply(401, "a bearer token is required (Authorization: Bearer …)",
                                   [("www-authenticate", "Bearer")])
        try:
            await asyncio.wait_for(self.app(scope, receive, tracked_send), self.config.request_timeout)
        except asyncio.TimeoutError:
            if not started:
                await reply(504, f"the request took longer than {self.config.request_timeout:g} s")


# The app -----------------------------------------------------------------------------------------
def create_app(index_dir, config: ServeConfig = ServeConfig(), *, encoder=None) -> FastAPI:
    """The service for `index_dir`. `encoder` (optional): the encoder that built it, already loaded.

    The gallery and its encoder are opened here, once; `app.state.holder` keeps them current.
    """
    holder = GalleryHolder(index_dir, encoder=encoder, use_gpu=config.use_gpu, codes=config.codes)
    holder.current().encoder  # load (and check) the model now, not on the first request
    counters = _Counters()
    budget = DecodeBudget(config.decode_memory)
    slots = threading.Semaphore(max(1, config.concurrency))

    app = FastAPI(title="robret", version="1", summary="Certified image retrieval with LipSim",
                  max_body_size=config.max_body_bytes, form_limits={"max_files": config.max_batch, "max_fields": 64},
                  description="Top-k search whose results carry certified ℓ2 radii over the query's own samples.")
    app.state.holder = holder
    app.state.config = config
    app.state.counters = counters
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])
    app.add_middleware(_Guard, config=config, counters=counters)

    @app.exception_handler(DecodeError)
    async def _decode_error(request: Request, exc: DecodeError):
        return JSONResponse({"detail": exc.reason, "kind": exc.kind}, 413 if exc.kind in _TOO_BIG else 422)

    def limits(gallery: Gallery) -> DecodeLimits:
        recorded = DecodeLimits(**gallery.meta.get("limits", {}))
        if config.max_pixels is None:
            return recorded
        return DecodeLimits(**{**recorded.__dict__, "max_pixels": min(recorded.max_pixels, config.max_pixels)})

    def check_k(k: int) -> int:
        if not 1 <= k <= config.max_k:
            raise HTTPException(422, f"k must be between 1 and {config.max_k}")
        return k

    def check_eps(eps: float | None) -> None:
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise HTTPException(422, f"eps must be a finite number ≥ 0, not {eps}")

    def decode_upload(gallery: Gallery, data: bytes) -> Image.Image:
        lim = limits(gallery)
        if len(data) > lim.max_bytes:
            raise DecodeError("too_large", f"{len(data)} bytes exceeds the {lim.max_bytes}-byte limit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image, _, _ = decode_bytes(data, lim)  # the header's pixel count is checked before decoding
        try:
            check_shape(*oriented_size(image), lim)
        except DecodeError:
            image.close()
            raise
        return image

    def indexed_record(gallery: Gallery, item_id: int) -> FileRecord:
        rec = gallery.records([item_id])[0]
        if rec is None or rec.status != INDEXED:
            raise HTTPException(404, f"no indexed file with id {item_id}")
        return rec

    def indexed_image(gallery: Gallery, item_id: int) -> Image.Image:
        """The file (or object) of an indexed id as indexed (`Gallery.image`: confined to the indexed root on
        the opened descriptor or by key, content hash unchanged)."""
        indexed_record(gallery, item_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                return gallery.image(item_id)
            except DecodeError as exc:
                if exc.kind in ("symlink_escape", "outside_root", "unsafe_name"):
                    raise HTTPException(404, f"the file of id {item_id} is no longer inside the indexed folder") \
                        from None
                raise

    def run_search(gallery: Gallery, query: dict, image: Image.Image, k: int, eps: float | None,
                   exclude: list[int]) -> dict:
        with slots:
            res = search_image(gallery, image, k=k, eps=eps, exclude=exclude)
        counters.searches += 1
        return result_document(res, query, gallery)

    def search_upload(data: bytes, filename: str | None, k: int, eps: float | None, exclude_self: bool) -> dict:
        gallery = holder.current()
        digest = hashlib.sha256(data).hexdigest()
        with budget.reserve(decode_cost(data)):
            image = decode_upload(gallery, data)
            query = {"upload": os.path.basename(filename or "") or None, "bytes": len(data), "sha256": digest}
            return run_search(gallery, query, image, k, eps, gallery.same_content(digest) if exclude_self else [])

    def search_id(item_id: int, k: int, eps: float | None, exclude_self: bool) -> dict:
        gallery = holder.current()
        image = indexed_image(gallery, item_id)
        query = {"id": item_id, "path": shown_path(gallery.path(item_id))}
        return run_search(gallery, query, image, k, eps, [item_id] if exclude_self else [])

    @app.post("/search", summary="Certified top-k for one query (an upload or an indexed id)")
    async def search(file: UploadFile | None = File(None), id: int | None = Form(None), k: int = Form(10),
                     eps: float | None = Form(None), exclude_self: bool = Form(False)) -> dict:
        check_k(k)
        check_eps(eps)
        if (file is None) == (id is None):
            raise HTTPException(422, "give exactly one of `file` (an image upload) or `id` (an indexed id)")
        if file is not None:
            data = await file.read()
            return await run_in_threadpool(search_upload, data, file.filename, k, eps, exclude_self)
        return await run_in_threadpool(search_id, id, k, eps, exclude_self)

    @app.post("/search/batch", summary="Certified top-k for several queries (uploads and/or indexed ids)")
    async def search_batch(files: list[UploadFile] = File([]), ids: list[int] = Form([]), k: int = Form(10),
                           eps: float | None = Form(None), exclude_self: bool = Form(False)) -> dict:
        check_k(k)
        check_eps(eps)
        n = len(files) + len(ids)
        if not 1 <= n <= config.max_batch:
            raise HTTPException(422, f"a batch holds 1 to {config.max_batch} queries (`files` and `ids`), not {n}")
        jobs = [(search_upload, (await f.read(), f.filename), {"upload": os.path.basename(f.filename or "") or None})
                for f in files] + [(search_id, (i,), {"id": i}) for i in ids]
        results = []
        for fn, args, query in jobs:  # (uploads first, then ids: each result's `query` says which it answers)
            try:
                results.append(await run_in_threadpool(fn, *args, k, eps, exclude_self))
            except DecodeError as exc:
                results.append({"query": query, "error": {"status": 413 if exc.kind in _TOO_BIG else 422,
                                                          "kind": exc.kind, "detail": exc.reason}})
            except HTTPException as exc:
                results.append({"query": query, "error": {"status": exc.status_code, "detail": exc.detail}})
        return {"results": results}

    @app.get("/items/{item_id}", summary="Catalog metadata and a thumbnail of an indexed file")
    def item(item_id: int, thumbnail: bool = True) -> dict:
        from encoder.image import thumbnail_jpeg

        gallery = holder.current()
        rec = indexed_record(gallery, item_id)
        meta = {key: (value if value is None or isinstance(value, (int, float, str)) else str(value))
                for key, value in record_dict(rec).items()}
        out = {"item": meta, "index_version": gallery.version}
        if thumbnail:
            jpeg = thumbnail_jpeg(indexed_image(gallery, item_id), config.thumbnail_side)
            out["thumbnail"] = {"media_type": "image/jpeg", "base64": base64.b64encode(jpeg).decode("ascii")}
        return out

    @app.get("/healthz", summary="Liveness and the index version being served")
    def healthz() -> dict:
        gallery = holder.current()
        return {"status": "ok", "index_version": gallery.version, "items": len(gallery)}

    @app.get("/stats", summary="Index facts and service counters")
    def stats() -> dict:
        gallery = holder.current()
        facts = index_stats(gallery.index_dir)
        facts.pop("catalog", None)  # a database URL is nobody's business over HTTP
        return {"index": facts, "serving": {
            "index_version": gallery.version, "items": len(gallery), "reloads": holder.reloads,
            "uptime_s": round(time.time() - counters.started, 3), "requests": counters.requests,
            "searches": counters.searches, "responses": dict(counters.by_status),
            "limits": {"max_body_bytes": config.max_body_bytes, "max_pixels": limits(gallery).max_pixels,
                       "request_timeout_s": config.request_timeout, "max_batch": config.max_batch},
            "codes": _codes_state(gallery, config), "gpu": _gpu_state(gallery, config)}}

    return app
