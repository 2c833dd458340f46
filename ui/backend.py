"""Thin adapter from the page to the library: index/ (galleries, certified search) and retrieval/ (attacks).

Everything the page needs from other packages goes through here, so the engine speaks one small
vocabulary: gallery ids (the primary index's), scores, radii, working-image tensors.

Galleries:
  * primary: `--index-dir`, or the demo index of the bundled sample photos, built (or brought up to
    date) in the cache directory with `index.build_index`;
  * comparison: an index of the same folder with the comparison encoder, built or updated in the
    cache directory the same way (or an existing index directory given as `--compare DIR`).
Its ids are mapped to the primary's through the files' relative paths.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .config import UIConfig

log = logging.getLogger(__name__)

DEFAULT_DREAMSIM = "dreamsim:ensemble"
FALLBACK_COMPARE = "standard:demo"


class SetupError(RuntimeError):
    """The page cannot start: no usable gallery or comparison encoder (the message says what to do)."""


@dataclass
class SideResult:
    ids: np.ndarray  # (depth,) primary ids, best first; the top-k exactly as retrieval.search returned it
    scores: np.ndarray  # (depth,)
    radius: np.ndarray | None = None  # (k,) in the query image's pixels
    set_radius: float | None = None
    order_radius: float | None = None


@dataclass
class Opened:
    index_dir: Path
    items: list  # [(primary id, relative path, absolute path)]
    lipsim_encoder: object
    lipsim_index: "SideIndex"
    compare_encoder: object
    compare_index: "SideIndex"
    notes: list[str] = field(default_factory=list)


# --- gallery images ------------------------------------------------------------------------------------
def read_gallery_image(path: Path) -> Image.Image:
    """A gallery file through the gallery's own hardened decoder (DecodeError with a reason)."""
    from index.decode import read_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return read_image(path).image


def thumbnail_bytes(image: Image.Image, side: int) -> bytes:
    """JPEG thumbnail with the encoder's own conversions (EXIF, alpha on white, 16-bit, CMYK…)."""
    from encoder.preprocess import pil_to_tensor

    from .query import to_pil

    im = to_pil(pil_to_tensor(image))
    im.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def placeholder_bytes(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 200, 200)).save(buf, format="JPEG")
    return buf.getvalue()


# --- one encoder's gallery -----------------------------------------------------------------------------
class SideIndex:
    """An opened index.Gallery whose ids are reported as the primary gallery's ids."""

    def __init__(self, gallery, to_primary: dict[int, int] | None = None):
        self.gallery = gallery
        self._to_primary = to_primary
        self._from_primary = None if to_primary is None else {p: i for i, p in to_primary.items()}
        self._all: tuple[np.ndarray, np.ndarray] | None = None

    def _map(self, i: int) -> int | None:
        return int(i) if self._to_primary is None else self._to_primary.get(int(i))

    def _map_many(self, ids) -> np.ndarray:
        """Primary ids; −1 for a file the primary gallery does not hold (e.g. added between builds)."""
        return np.array([-1 if (m := self._map(i)) is None else m for i in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.gallery)

    def candidates(self, q: np.ndarray, pool: int, extra=()) -> tuple[np.ndarray, np.ndarray]:
        """(primary ids, unit vectors (n, D)) an attack optimises against: the whole gallery when it has
        at most `pool` items, else the query's exact top-`pool` plus the `extra` primary ids (a target).
        """
        if len(self.gallery) <= pool:
            if self._all is None:  # small gallery: kept once (immutable afterwards)
                ids, vectors = self.gallery.all_vectors()
                mapped = self._map_many(ids)
                self._all = (mapped[mapped >= 0], vectors[mapped >= 0])
            return self._all
        _, found = self.gallery.search(q[None], pool, exact=True)
        own = [int(i) for i in found[0] if i >= 0]
        for p in extra:
            i = p if self._from_primary is None else self._from_primary.get(int(p))
            if i is not None and i not in own:
                own.append(int(i))
        mapped = self._map_many(own)
        vectors = self.gallery.vectors(np.array(own, dtype=np.int64))
        return mapped[mapped >= 0], vectors[mapped >= 0]

    def search(self, q: np.ndarray, k: int, depth: int, input_norm: float | None,
               query_size: tuple[int, int]) -> SideResult:
        """retrieval.search.search_embedding for the top-k (certified when the encoder allows), plus
        the exhaustive list to `depth` to report where displaced items went."""
        from retrieval.search import search_embedding

        res = search_embedding(self.gallery, q, k, input_norm=input_norm, query_size=query_size)
        top = self._map_many([h.id for h in res.hits])
        scores, ids = self.gallery.search(q[None], max(depth, k), exact=True)
        seen = set(top.tolist())
        rest = [(m, s) for m, s in zip(self._map_many(ids[0][ids[0] >= 0]), scores[0][ids[0] >= 0])
                if m not in seen]
        out = SideResult(
            ids=np.concatenate([top, np.array([i for i, _ in rest], dtype=np.int64)]),
            scores=np.concatenate([np.array([h.score for h in res.hits]), np.array([s for _, s in rest])]),
        )
        if res.certified:
            out.radius = np.array([h.radius for h in res.hits])
            out.set_radius, out.order_radius = res.set_radius, res.order_radius
        return out


# --- opening: demo index, comparison encoder and its index ---------------------------------------------
def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-")[:60] or "encoder"


def _demo_encoder_spec(cfg: UIConfig) -> str:
    from encoder.registry import bundled_weights

    if cfg.demo_encoder:
        return cfg.demo_encoder
    return "lipsim:demo" if "demo" in bundled_weights("lipsim") else "lipsim:cpu-small"


def _build(folder: Path, index_dir: Path, spec: str, encoder):
    """Build, or bring up to date, the index of `folder` with `encoder` (index.build_index)."""
    from index import IngestOptions, build_index

    report = build_index(folder, index_dir, spec, encoder=encoder,
                         options=IngestOptions(workers=1, use_gpu=torch.cuda.is_available()))
    log.info("index %s: %d embedded, %d unchanged, %d failed", index_dir, report.embedded, report.unchanged,
             len(report.failed))
    return report


def demo_index(cfg: UIConfig) -> Path:
    """The demo index of the bundled sample photos in the cache directory (built once, then reused)."""
    from encoder import load_encoder
    from encoder.samples import export_sample_photos

    spec = _demo_encoder_spec(cfg)
    photos = cfg.cache_path / "demo" / "photos"
    export_sample_photos(photos)
    index_dir = cfg.cache_path / "demo" / f"index-{_slug(spec)}"
    _build(photos, index_dir, spec, load_encoder(spec))
    return index_dir


def pick_compare(cfg: UIConfig):
    """(encoder spec, encoder, notes): cfg.compare, else DreamSim when its weights load, else standard:demo."""
    from encoder import load_encoder

    if cfg.compare:
        try:
            return cfg.compare, load_encoder(cfg.compare), []
        except (ValueError, RuntimeError, OSError, ImportError) as exc:
            raise SetupError(f"cannot load the comparison encoder {cfg.compare!r}: {exc}") from None
    try:
        return DEFAULT_DREAMSIM, load_encoder(DEFAULT_DREAMSIM), []
    except (ValueError, RuntimeError, OSError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        note = (f"DreamSim is not available here ({first[:200]}); the comparison is the standard CNN "
                f"baseline {FALLBACK_COMPARE}.")
        log.info(note)
    try:
        return FALLBACK_COMPARE, load_encoder(FALLBACK_COMPARE), [note]
    except (ValueError, RuntimeError, OSError) as exc:
        raise SetupError(f"no comparison encoder: DreamSim's weights are not installed and {FALLBACK_COMPARE} "
                         f"cannot be loaded ({exc}); pass --compare SPEC (e.g. pixels)") from None


def _open_compare(cfg: UIConfig, primary, primary_dir: Path):
    """The comparison gallery over the primary's folder: an index dir given as --compare, or one built
    (or updated) in the cache with the comparison encoder."""
    from index import Gallery
    from index.layout import IndexDir

    if cfg.compare and IndexDir(cfg.compare).exists():
        g = Gallery.open(cfg.compare, use_gpu=torch.cuda.is_available())
        if g.root != primary.root:
            raise SetupError(f"--compare {cfg.compare} indexes {g.root}, not the gallery's folder {primary.root}")
        return g, []
    spec, enc, notes = pick_compare(cfg)
    tag = hashlib.sha1(f"{primary_dir.resolve()}|{spec}".encode()).hexdigest()[:12]
    index_dir = cfg.cache_path / "compare" / f"{_slug(spec)}-{tag}"
    _build(primary.root, index_dir, spec, enc)
    return Gallery.open(index_dir, encoder=enc, use_gpu=torch.cuda.is_available()), notes


def open_gallery(cfg: UIConfig) -> Opened:
    from index import Gallery, GalleryError

    notes: list[str] = []
    try:
        if cfg.index_dir:
            primary_dir = Path(cfg.index_dir)
        else:
            primary_dir = demo_index(cfg)
            notes.append(f"Demo gallery: the {len(list((primary_dir.parent / 'photos').iterdir()))} sample photos "
                         "that scikit-image and matplotlib ship.")
        primary = Gallery.open(primary_dir, use_gpu=torch.cuda.is_available())
        lip = primary.encoder
        compare, cmp_notes = _open_compare(cfg, primary, primary_dir)
        cmp_enc = compare.encoder
    except GalleryError as exc:
        raise SetupError(str(exc)) from None
    notes += cmp_notes
    if lip.lipschitz is None:
        notes.append(f"{lip.name} has no Lipschitz bound: its results carry no certificate.")
    for enc in (lip, cmp_enc):
        if not enc.pretrained:
            notes.append(f"{enc.name}: random weights — rankings show the machinery, not perceptual quality.")
    ids = primary.ids()
    records = primary.records(ids)
    items = sorted(((int(i), r.path, primary.path(int(i))) for i, r in zip(ids, records) if r is not None),
                   key=lambda t: t[1])
    by_path = {name: i for i, name, _ in items}
    cmp_ids = compare.ids()
    to_primary = {int(i): by_path[r.path] for i, r in zip(cmp_ids, compare.records(cmp_ids))
                  if r is not None and r.path in by_path}
    missing = len(items) - len(to_primary)
    if missing:
        notes.append(f"{missing} gallery image(s) are missing from {cmp_enc.name}'s index.")
    return Opened(primary_dir, items, lip, SideIndex(primary), cmp_enc, SideIndex(compare, to_primary), notes)


# --- attacks -------------------------------------------------------------------------------------------
def run_attack(embedder, index: SideIndex, x: torch.Tensor, spec, q: np.ndarray, pool: int,
               progress: Callable[[int, int], None]):
    """Attack the working image x (3, H, W) on one encoder; returns x_adv (3, H, W).

    The attack optimises against `index.candidates` (the whole gallery when it is small); the page
    then searches the adversarial image in the full index, so what it shows is exact either way.
    untargeted / targeted: retrieval.attacks' top-k PGD attacks; autoattack: retrieval.attacks'
    AutoAttack on nearest-neighbour search (move the top-1), with a step budget and progress.
    """
    from retrieval.attacks import PGDConfig, autoattack_untargeted, topk_targeted, topk_untargeted

    extra = () if spec.target_id is None else (spec.target_id,)
    ids, vectors = index.candidates(q, pool, extra)
    g = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    k = min(spec.k, len(ids) - 1)

    def callback(done, total, _loss):
        progress(done, total)

    if spec.kind == "autoattack":  # APGD-CE then APGD-DLR, one restart, `steps` iterations each
        x_adv, _ = autoattack_untargeted(embedder, x[None], g, norm=spec.norm, eps=spec.eps, version="custom",
                                         attacks=["apgd-ce", "apgd-dlr"], n_iter=spec.steps, callback=callback)
        return x_adv[0].detach().cpu()
    config = PGDConfig(norm=spec.norm, eps=spec.eps, steps=spec.steps)
    if spec.kind == "untargeted":
        res = topk_untargeted(embedder, x[None], g, k=k, config=config, callback=callback)
    else:
        hit = np.flatnonzero(ids == spec.target_id)
        if hit.size == 0:
            raise ValueError("the target image is not in this encoder's index")
        res = topk_targeted(embedder, x[None], g, int(hit[0]), k=k, config=config, callback=callback)
    return res.x_adv[0].detach().cpu()
