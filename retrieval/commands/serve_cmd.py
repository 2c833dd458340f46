"""`robret serve`: the certified search service (retrieval/serve.py) under uvicorn."""
from __future__ import annotations

import os
import sys
from pathlib import Path

TOKEN_ENV = "ROBRET_API_TOKEN"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve certified search over HTTP (FastAPI + uvicorn)",
                       description="Answer certified top-k queries over HTTP: POST /search (an image upload or an "
                       "indexed id), POST /search/batch, GET /items/{id}, /healthz, /stats; the OpenAPI schema is at "
                       "/docs. The model and the index load once; a newly committed index version is picked up "
                       f"without restart. Set {TOKEN_ENV} to require a bearer token (required when --host is not "
                       "a loopback address).")
    p.add_argument("--index-dir", required=True, help="an index built by `robret index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--max-upload-mb", type=float, default=32, help="largest request body in MB (default 32)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest upload in pixels, checked from the header (default: the index's limit)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request is answered 504 (default 60)")
    p.add_argument("--concurrency", type=int, default=2, help="queries embedded at once (default 2)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--cpu", action="store_true", help="search on the CPU even if a GPU is visible")
    p.add_argument("--no-codes", action="store_true",
                   help="do not build int8 codes of a gallery of ≥ 100,000 vectors (by default they are built once, "
                   "in the background, and make certified queries ~3× faster for D + 16 bytes a vector of memory; "
                   "on a GPU none are built, the gallery is searched there)")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from retrieval.serve import ServeConfig, create_app, is_loopback

    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and token is None:
        raise ValueError(f"--host {args.host} is reachable from other machines: set {TOKEN_ENV} to a secret "
                         "bearer token first")
    if not Path(args.index_dir).is_dir():
        raise FileNotFoundError(f"--index-dir {args.index_dir}: no such directory")
    if args.max_upload_mb <= 0 or args.timeout <= 0 or args.concurrency < 1:
        raise ValueError("--max-upload-mb and --timeout must be positive, --concurrency at least 1")
    config = ServeConfig(token=token, max_body_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                         request_timeout=args.timeout, concurrency=args.concurrency,
                         cors_origins=tuple(args.cors_origin), use_gpu=not args.cpu, codes=not args.no_codes)
    sock = listen(args.host, args.port)  # before the model loads: a port in use is said at once
    try:
        app = create_app(args.index_dir, config)
        gallery = app.state.holder.current()
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"serving {gallery.index_dir} ({len(gallery)} images, {gallery.encoder_spec}, version {gallery.version}) "
              f"on http://{host}:{port}  (API docs: /docs{'; bearer token required' if token else ''})",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="debug" if args.verbose else "warning",
                                               timeout_keep_alive=5, limit_concurrency=64, server_header=False))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def listen(host: str, port: int):
    """A socket bound to (host, port) (port 0: a free one), for uvicorn to listen on (`robret ui` only takes its
    port); OSError naming the address when it cannot be bound (in use, not this machine's)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
