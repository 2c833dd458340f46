"""Decode + preprocess + embed on a Ray cluster (Ray Data), feeding the single index writer.

    from index import IngestOptions, build_index
    from index.ray_embed import RayEmbedder, connect
    connect("auto")                                   # or None: a local cluster (ray.init)
    build_index("photos/", "photos-index/", "lipsim:demo",
                options=IngestOptions(embed_files=RayEmbedder(actors=4)))

The writer (index/ingest.py) lists, reads and hashes every file itself, so unchanged, renamed and
duplicate files are settled before anything is scheduled; only files that need embedding go to Ray.
There, a Ray Data pipeline `from_items(paths).map_batches(_EmbedActor, concurrency=N)` runs an actor
pool: each actor loads the encoder once (one GPU per actor when the cluster has GPUs, one CPU
otherwise), checks its weights against the fingerprint the catalog recorded, and per batch reads,
hashes (each read confined to the indexed root on its opened descriptor, as the writer's; an object
store's URIs through index/remote.py, with the driver's endpoint settings), decodes (the
same `preprocess_bytes` as a local run, so failures carry the same reasons) and
embeds. Embedded batches stream back (`iter_batches`) to the writer, which handles them in listing
order and checkpoints exactly as a local run does: catalog, ids and crash safety are unchanged.

A dead actor is restarted by Ray and its batch retried; a batch that comes back twice cannot add a row
twice (the writer keys results by position). If the driver dies, nothing was committed beyond the last
checkpoint, and `robret index update` finishes the work.

`ROBRET_RAY_CRASH_ONCE=<marker file>` (forwarded to the actors) makes the first actor batch that
creates the marker kill its own process: tests use it to kill an actor mid-run.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict

import numpy as np
import ray
import torch
from PIL import Image

from . import embedder
from .catalog import check_same_encoder
from .decode import DecodeError, DecodeLimits, hash_bytes, read_bytes
from .ingest import preprocess_bytes
from .remote import SETTINGS_ENV

__all__ = ["RayEmbedder", "connect", "RAY_CRASH_ENV"]

log = logging.getLogger(__name__)

RAY_CRASH_ENV = "ROBRET_RAY_CRASH_ONCE"


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the running one; None: RAY_ADDRESS or a new local one)."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


class _EmbedActor:
    """One Ray actor: the encoder loaded once; a batch of paths in, vectors (or failure reasons) out."""

    def __init__(self, identity: dict, limits: dict, root: bytes | None = None):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides GPUs from actors that did not ask for one
        self.encoder = embedder.load(identity["spec"], device)
        check_same_encoder(identity, embedder.identity(self.encoder, identity["spec"]))
        self.limits = DecodeLimits(**limits)
        self.root = root  # every read confined to the indexed root, on the opened descriptor

    def __call__(self, batch: dict) -> dict:
        _crash_once()
        n = len(batch["i"])
        out = {"i": np.asarray(batch["i"], np.int64), "vector": np.zeros((n, int(self.encoder.dim)), np.float32),
               "digest": [""] * n, "size": np.zeros(n, np.int64), "width": np.zeros(n, np.int64),
               "height": np.zeros(n, np.int64), "notes": [""] * n, "error": [""] * n}
        tensors, rows = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for j, path in enumerate(batch["path"]):
                try:
                    data = read_bytes(bytes(path), self.limits.max_bytes, root=self.root)
                    out["digest"][j], out["size"][j] = hash_bytes(data), len(data)
                    tensor, out["width"][j], out["height"][j], notes = preprocess_bytes(data, self.limits, self.encoder)
                    out["notes"][j] = "\n".join(notes)
                except DecodeError as exc:
                    out["error"][j] = f"{exc.kind}\n{exc.detail}"
                    continue
                tensors.append(tensor)
                rows.append(j)
        if tensors:
            out["vector"][rows] = embedder.embed_inputs(self.encoder, tensors)
        out.update({key: np.asarray(out[key], dtype=object) for key in ("digest", "notes", "error")})
        return out


def _crash_once() -> None:
    marker = os.environ.get(RAY_CRASH_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class RayEmbedder:
    """`IngestOptions.embed_files` on Ray Data: an actor pool of encoders (see the module doc).

    actors: pool size (default: the cluster's GPUs, else its CPUs); batch_size: files per actor call;
    use_gpu=False: CPU actors even on a cluster with GPUs.
    """

    def __init__(self, actors: int | None = None, batch_size: int = 32, use_gpu: bool = True):
        self.actors, self.batch_size, self.use_gpu = actors, max(1, int(batch_size)), use_gpu

    def __call__(self, paths: list[bytes], identity: dict, limits: DecodeLimits, root: bytes | None = None):
        if not paths:
            return
        connect()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if self.use_gpu else 0
        actors = self.actors or max(1, gpus or int(resources.get("CPU", 1)))
        # Actors read object stores with the driver's settings (endpoint, region, anonymous access), never
        # with its credentials: those come from each node's own environment or identity.
        env = {k: os.environ[k] for k in (RAY_CRASH_ENV, *SETTINGS_ENV) if os.environ.get(k)}
        runtime_env = {"env_vars": env} if env else None
        log.info("embedding %d files on %d Ray actors (%s)", len(paths), actors, "GPU" if gpus else "CPU")
        blocks = max(1, min(len(paths) // self.batch_size + 1, 4 * actors))
        ds = ray.data.from_items([{"i": i, "path": p} for i, p in enumerate(paths)], override_num_blocks=blocks)
        kwargs = {"identity": identity, "limits": asdict(limits), "root": root}
        ds = ds.map_batches(_EmbedActor, fn_constructor_kwargs=kwargs, batch_size=self.batch_size, batch_format="numpy", concurrency=actors,
                            num_gpus=1 if gpus else None, num_cpus=None if gpus else 1, runtime_env=runtime_env)
        # Ray Data's actor pools restart dead actors and retry their batches by default.
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for j in range(len(batch["i"])):
                error = batch["error"][j]
                if error:
                    kind, _, detail = str(error).partition("\n")
                    yield int(batch["i"][j]), DecodeError(kind, detail)
                    continue
                notes = str(batch["notes"][j])
                yield int(batch["i"][j]), {"vector": np.asarray(batch["vector"][j], np.float32),
                                           "digest": str(batch["digest"][j]), "size": int(batch["size"][j]),
                                           "width": int(batch["width"][j]), "height": int(batch["height"][j]),
                                           "notes": notes.split("\n") if notes else []}
