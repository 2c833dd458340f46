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

import numpy as np
import torch
from PIL import Image, ImageDraw

from encoder.choose import DEFAULT_DREAMSIM  # noqa: F401  (re-exported: the comparison the page prefers)
from encoder.image import thumbnail_jpeg

from .config import UIConfig

log = logging.getLogger(__name__)

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
def read_gallery_image(gallery, item_id: int) -> Image.Image:
    """A gallery file as indexed (index.Gallery.image: inside the gallery's folder, content unchanged),
    else DecodeError with a reason (kind "changed": changed since indexed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return gallery.image(item_id)


def gallery_thumbnail(gallery, item_id: int, side: int) -> bytes:
    """A gallery file's thumbnail; a labelled placeholder when the file is no longer what was indexed
    ("changed since indexed"), has left the folder, or is gone: such a file's pixels are never shown."""
    from index.decode import DecodeError

    try:
        image = read_gallery_image(gallery, item_id)
    except DecodeError as exc:
        return placeholder_bytes(side, "changed since\nindexed" if exc.kind == "changed"
                                 else exc.kind.replace("_", " "))
    return thumbnail_jpeg(image, side)


def placeholder_bytes(side: int, text: str = "") -> bytes:
    """A grey JPEG square, with `text` (e.g. "changed since indexed") written across it."""
    im = Image.new("RGB", (side, side), (200, 200, 200))
    draw = ImageDraw.Draw(im)
    for n, line in enumerate(text.split("\n") if text else []):
        draw.text((6, 6 + 14 * n), line, fill=(90, 20, 20))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


# --- one encoder's gallery -----------------------------------------------------------------------------
class SideIndex:
    """An opened index.Gallery whose ids are reported as the primary gallery's ids."""

    def __init__(self, gallery, to_primary: dict[int, int] | None = None):
        self.gallery = gallery
        self._to_primary = to_primary
        self._from_primary = None if to_primary is None else {p: i for i, p in to_primary.items()}
        # Its items the primary gallery does not hold (a file added since, or left out of the primary's list): left
        # out of every search, attack and certificate, so that both sides rank the same images.
        self.hidden = () if to_primary is None else tuple(int(i) for i in gallery.ids() if int(i) not in to_primary)

    def _map(self, i: int) -> int | None:
        return int(i) if self._to_primary is None else self._to_primary.get(int(i))

    def primary_ids(self, ids) -> np.ndarray:
        """Primary ids; −1 for a file the primary gallery does not hold (e.g. added between builds)."""
        return np.array([-1 if (m := self._map(i)) is None else m for i in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.gallery) - len(self.hidden)

    def own_id(self, primary_id: int) -> int | None:
        """This gallery's id of a primary id (None: the file is not in this index)."""
        return int(primary_id) if self._from_primary is None else self._from_primary.get(int(primary_id))

    def candidates(self, q: np.ndarray, pool: int, extra=()) -> tuple[np.ndarray, np.ndarray]:
        """(primary ids, unit vectors (n, D)) an attack optimises against (retrieval.attacks.attack_candidates:
        the whole gallery when it has at most `pool` items, else the query's exact top-`pool` plus the
        `extra` primary ids)."""
        from retrieval.attacks import attack_candidates

        own = [i for i in (self.own_id(p) for p in extra) if i is not None]
        ids, vectors = attack_candidates(self.gallery, q, pool, own, self.hidden)
        return self.primary_ids(ids), vectors

    def ranked(self, ranking) -> SideResult:
        """A retrieval.attacks.Ranking with its ids reported as primary ids."""
        res = ranking.search
        out = SideResult(ids=self.primary_ids(ranking.ids), scores=np.asarray(ranking.scores))
        if res.certified:
            out.radius = np.array([h.radius for h in res.hits])
            out.set_radius, out.order_radius = res.set_radius, res.order_radius
        return out

    def search(self, q: np.ndarray, k: int, depth: int, input_norm: float | None,
               query_size: tuple[int, int]) -> SideResult:
        """retrieval.attacks.rank_query: the top-k (certified when the encoder allows) and the exhaustive
        list to `depth` to report where displaced items went."""
        from retrieval.attacks import rank_query

        return self.ranked(rank_query(self.gallery, q, k, depth, input_norm=input_norm, query_size=query_size,
                                      exclude=self.hidden))


# --- opening: demo index, comparison encoder and its index ---------------------------------------------
def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-")[:60] or "encoder"


def _demo_encoder_spec(cfg: UIConfig) -> str:
    from encoder.choose import default_lipsim_spec

    return default_lipsim_spec(cfg.demo_encoder)


def _build(folder: Path, index_dir: Path, spec: str, encoder):
    """Build, or bring up to date, the cached index of `folder` with `encoder` (index.build_cache_index:
    rebuilt when the encoder's weights changed under the same spec)."""
    from index import IngestOptions, build_cache_index

    report = build_cache_index(folder, index_dir, spec, encoder=encoder,
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
    index_dir = cfg.cache_path / "demo" / f"index-{_slug(spec)}"
    with _cache_lock(cfg.cache_path / "demo"):
        export_sample_photos(photos)
        _build(photos, index_dir, spec, load_encoder(spec))
    return index_dir


def _cache_lock(folder: Path):
    """A blocking lock over a cache folder that pages build into: two UI sessions (or processes) opening
    at once wait for each other instead of one of them failing on the index's non-blocking writer lock."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".build.lock"))


def pick_compare(cfg: UIConfig):
    """(encoder spec, encoder, notes): cfg.compare, else encoder.choose.choose_comparison (DreamSim when
    its weights load, else FALLBACK_COMPARE, else pixels)."""
    from encoder.choose import choose_comparison

    if cfg.compare:
        try:
            choice = choose_comparison(cfg.compare)
        except (ValueError, RuntimeError, OSError, ImportError) as exc:
            raise SetupError(f"cannot load the comparison encoder {cfg.compare!r}: {exc}") from None
        return choice.spec, choice.encoder, choice.notes
    try:
        choice = choose_comparison(fallbacks=(FALLBACK_COMPARE, "pixels"))
    except RuntimeError as exc:
        raise SetupError(f"{exc}; pass --compare SPEC") from None
    return choice.spec, choice.encoder, choice.notes


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
    with _cache_lock(index_dir.parent):
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
        primary.prepare_search(background=True)  # int8 codes for certified queries (large galleries), or the GPU copy
        lip = primary.encoder
        compare, cmp_notes = _open_compare(cfg, primary, primary_dir)
        compare.prepare_search(background=True)  # (its codes too, or its GPU copy: off the page's requests either way)
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
