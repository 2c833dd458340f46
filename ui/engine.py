"""The page's back end: two encoders over one gallery, searches with certificates, attacks on both.

One `Engine` per (index, comparison encoder) is shared by every browser session (st.cache_resource);
it holds no per-user state. Searches and attacks run under one lock, so two sessions never compete
for the CPU inside torch at once (the second waits), and nothing shared is mutated after start-up.

The query is the user's image itself (ui/query.py): the file's own samples (C, H, W) in [0, 1] in
its channel layout. Each encoder sees them through the same map as `robret query` (channel conversion
and float resize, retrieval.attacks.ImageEmbedder), so certified radii, ε and ‖δ‖ are stated over
those samples and the page's radius is `robret query`'s. Attacks search on a copy no larger than
`work_side` for speed (retrieval.attacks.WorkingCopy) and are measured on the full image.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from retrieval.attacks import QUERY_ATTACKS, RankedIds, rank_moves

from . import backend
from .config import UIConfig

__all__ = ["Engine", "Ranking", "AttackSpec", "SideAttack", "ATTACK_KINDS"]

# kind → label shown on the page
ATTACK_KINDS = QUERY_ATTACKS


@dataclass(frozen=True)
class GalleryItem:
    id: int  # the LipSim index's stable id (the comparison index's ids are mapped to these)
    name: str  # path relative to the gallery folder
    path: Path  # absolute path of the file


@dataclass
class Ranking(RankedIds):
    """One encoder's answer for one query: the ranked list to `depth` and the certified top-k."""

    ids: np.ndarray  # (depth,) gallery ids, best first
    scores: np.ndarray  # (depth,) cosine similarities
    k: int
    radius: np.ndarray | None = None  # (k,) item i stays in the top-k for ‖δ‖₂ < radius[i] (the query's samples)
    set_radius: float | None = None  # the top-k set cannot change for ‖δ‖₂ < set_radius
    order_radius: float | None = None  # the ordered top-k cannot change for ‖δ‖₂ < order_radius
    seconds: float = 0.0  # wall time of embed + search + certify
    embedding: np.ndarray | None = None  # (D,) the query's embedding
    values: int | None = None  # samples the radii are over (C·H·W), for rms255

    def rms255(self, l2: float | None) -> float | None:
        """An ℓ2 norm over the query's samples as the RMS change per sample in 1/255: ℓ2/√values·255."""
        return None if l2 is None or not self.values else l2 / self.values ** 0.5 * 255


@dataclass(frozen=True)
class AttackSpec:
    kind: str  # a key of ATTACK_KINDS
    norm: str  # "l2" or "linf"
    eps: float  # budget in [0, 1] units of the query's own samples
    steps: int
    k: int
    target_id: int | None = None  # gallery id, for kind == "targeted"

    def __post_init__(self):
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}; known: {', '.join(ATTACK_KINDS)}")
        if self.norm not in ("l2", "linf"):
            raise ValueError(f"norm must be 'l2' or 'linf', got {self.norm!r}")
        if self.kind == "targeted" and self.target_id is None:
            raise ValueError("a targeted attack needs a target image")


@dataclass
class SideAttack:
    """What one attack did to one encoder's top-k."""

    side: str  # "lipsim" or "compare"
    label: str  # the encoder's real name
    x_adv: torch.Tensor  # (C, H, W) the adversarial query, full size, in the query's layout
    before: Ranking
    after: Ranking
    delta_l2: float
    delta_linf: float
    seconds: float
    certificate: dict | None = None  # certified encoders: retrieval.attacks.CertificateCheck.to_dict()
    target_rank: tuple[int | None, int | None] | None = None  # (before, after) for a targeted attack

    @property
    def overlap(self) -> float:
        """overlap@k = |top-k before ∩ top-k after| / k."""
        return len(set(self.before.top) & set(self.after.top)) / self.before.k

    def moves(self) -> list[dict]:
        """Rank moves of every item in either top-k (retrieval.attacks.rank_moves)."""
        return rank_moves(self.before, self.after)


class Side:
    """One encoder with its index over the gallery."""

    def __init__(self, key: str, encoder, index: "backend.SideIndex"):
        from retrieval.attacks import ImageEmbedder

        self.key = key
        self.encoder = encoder
        self.index = index
        self.embedder = ImageEmbedder(encoder)
        self.label = encoder.name

    @property
    def certified(self) -> bool:
        return self.encoder.lipschitz is not None

    def embedder_for(self, layout: str):
        """The differentiable samples → embedding map for queries in `layout` (ImageEmbedder)."""
        from retrieval.attacks import ImageEmbedder

        return self.embedder if layout == "RGB" else ImageEmbedder(self.encoder, layout=layout)

    def embed(self, x: torch.Tensor, layout: str = "RGB") -> np.ndarray:
        """(C, H, W) query samples in `layout` → unit-norm (D,) float32."""
        with torch.no_grad():
            return self.embedder_for(layout).embed(x[None])[0].cpu().numpy().astype(np.float32)

    def search(self, x: torch.Tensor, k: int, depth: int, layout: str = "RGB") -> Ranking:
        """Embed the query's samples and search; radii are stated over them (ImageEmbedder.input_norm)."""
        t0 = time.perf_counter()
        q = self.embed(x, layout)
        hw = tuple(int(v) for v in x.shape[-2:])
        norm = self.embedder_for(layout).input_norm(hw) if self.certified else None
        res = self.index.search(q, k=k, depth=depth, input_norm=norm, query_size=hw)
        return Ranking(ids=res.ids, scores=res.scores, k=k, radius=res.radius, set_radius=res.set_radius,
                       order_radius=res.order_radius, seconds=time.perf_counter() - t0, embedding=q,
                       values=int(x.numel()))

    def ranking(self, ranking) -> Ranking:
        """The page's Ranking (primary ids) of a retrieval.attacks.Ranking."""
        res = self.index.ranked(ranking)
        return Ranking(ids=res.ids, scores=res.scores, k=ranking.k, radius=res.radius, set_radius=res.set_radius,
                       order_radius=res.order_radius, embedding=ranking.embedding, values=ranking.search.values)


class Engine:
    """Both encoders, both indexes, the gallery; searches and attacks (see module doc)."""

    def __init__(self, cfg: UIConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        opened = backend.open_gallery(cfg)
        self.index_dir = opened.index_dir
        self.notes: list[str] = opened.notes
        self.gallery: list[GalleryItem] = [GalleryItem(i, n, p) for i, n, p in opened.items]
        self.by_id = {g.id: g for g in self.gallery}
        self.names = {g.id: g.name for g in self.gallery}
        self.lipsim = Side("lipsim", opened.lipsim_encoder, opened.lipsim_index)
        self.compare = Side("compare", opened.compare_encoder, opened.compare_index)
        self.load_seconds = time.perf_counter() - t0
        self._thumbs: dict[int, bytes] = {}

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.lipsim, self.compare

    def name_of(self, item_id: int) -> str:
        return self.names.get(int(item_id), "(not in the primary gallery)")

    def depth(self) -> int:
        return min(self.cfg.rank_depth, len(self.gallery))

    # -- gallery images ---------------------------------------------------------------------------------
    def image(self, item_id: int):
        """The gallery file as a decoded PIL image, only as indexed (DecodeError otherwise)."""
        return backend.read_gallery_image(self.lipsim.index.gallery, item_id)

    def thumbnail(self, item_id: int, side: int = 160) -> bytes:
        """A JPEG thumbnail of a gallery image (cached; shared, immutable once made)."""
        data = self._thumbs.get(item_id)
        if data is None and item_id not in self.by_id:
            return backend.placeholder_bytes(side)
        if data is None:
            data = backend.gallery_thumbnail(self.lipsim.index.gallery, item_id, side)
            if len(self._thumbs) > 4096:  # bounded: large galleries are browsed a few images at a time
                self._thumbs.clear()
            self._thumbs[item_id] = data
        return data

    # -- search -----------------------------------------------------------------------------------------
    def search(self, x: torch.Tensor, k: int, layout: str = "RGB") -> dict[str, Ranking]:
        """Both encoders' top-k for the query samples x (C, H, W) in `layout`."""
        k = max(1, min(k, len(self.gallery) - 1))
        with self._lock:
            return {s.key: s.search(x, k, max(k, self.depth()), layout) for s in self.sides}

    # -- attacks ----------------------------------------------------------------------------------------
    def attack(self, x: torch.Tensor, spec: AttackSpec, progress: Callable[[float, str], None] | None = None,
               layout: str = "RGB", space: str | None = None) -> dict[str, SideAttack]:
        """Attack the query samples x (C, H, W) in `layout` on each encoder (white-box, same budget) with
        retrieval.attacks.attack_query, searching on a copy of side ≤ cfg.work_side; progress(fraction, text)."""
        from retrieval.attacks import PGDConfig, attack_query

        if spec.steps > self.cfg.max_steps:
            raise ValueError(f"at most {self.cfg.max_steps} steps")
        k = max(1, min(spec.k, len(self.gallery) - 1))
        spec = dataclasses.replace(spec, k=k)
        depth = max(k, self.depth())
        config = PGDConfig(norm=spec.norm, eps=spec.eps, steps=spec.steps)
        out = {}
        with self._lock:
            for n, side in enumerate(self.sides):
                def report(done, total, _loss, side=side, n=n):
                    if progress is not None:
                        progress((n + done / max(total, 1)) / 2, f"{side.label}: step {done}/{total}")

                target = None
                if spec.target_id is not None:
                    target = side.index.own_id(spec.target_id)
                    if target is None:
                        raise ValueError("the target image is not in this encoder's index")
                t0 = time.perf_counter()
                res = attack_query(side.index.gallery, x, kind=spec.kind, config=config, k=k, target=target,
                                   embedder=side.embedder_for(layout), pool=self.cfg.attack_pool, depth=depth,
                                   callback=report, work_side=self.cfg.work_side, radius_space=space,
                                   exclude=side.index.hidden)
                before, after = side.ranking(res.before), side.ranking(res.after)
                result = SideAttack(side.key, side.label, res.x_adv, before, after, delta_l2=res.delta_l2,
                                    delta_linf=res.delta_linf, seconds=time.perf_counter() - t0)
                if spec.target_id is not None:
                    result.target_rank = (before.rank_of(spec.target_id), after.rank_of(spec.target_id))
                if res.certificate is not None:
                    cert = res.certificate.to_dict()
                    for key in ("guaranteed_items", "violated_items"):
                        cert[key] = side.index.primary_ids(cert[key]).tolist()
                    result.certificate = cert
                out[side.key] = result
        if progress is not None:
            progress(1.0, "done")
        return out


def ranking_rows(engine: "Engine", ranking: Ranking, upto: int | None = None) -> list[dict]:
    """The top-k (or `upto` first) of a ranking as JSON-ready rows: rank, id, name, score[, radius]."""
    rows = []
    for n, (item, score) in enumerate(zip(ranking.ids[: upto or ranking.k], ranking.scores)):
        row = {"rank": n + 1, "id": int(item), "name": engine.name_of(item), "score": float(score)}
        if ranking.radius is not None and n < ranking.k:
            row["radius"] = float(ranking.radius[n])
            row["radius_rms255"] = ranking.rms255(float(ranking.radius[n]))
        rows.append(row)
    return rows


def attack_report(engine: "Engine", query_label: str, query_hw: tuple[int, int], space: str,
                  spec: AttackSpec, results: dict[str, SideAttack]) -> dict:
    """Everything the page shows about one attack, as a JSON-serialisable dict."""
    enc = {}
    for key, res in results.items():
        side = engine.lipsim if key == "lipsim" else engine.compare
        enc[key] = {
            "name": res.label,
            "lipschitz": side.encoder.lipschitz,
            "certified": side.certified,
            "delta_l2": res.delta_l2,
            "delta_linf": res.delta_linf,
            "overlap_at_k": res.overlap,
            "seconds": res.seconds,
            "before": ranking_rows(engine, res.before),
            "after": ranking_rows(engine, res.after),
            "set_radius_before": res.before.set_radius,
            "set_radius_before_rms255": res.before.rms255(res.before.set_radius),
            "set_radius_after": res.after.set_radius,
            "delta_l2_rms255": res.before.rms255(res.delta_l2),
            "moves": [{**m, "name": engine.name_of(m["id"])} for m in res.moves()],
            "target_rank": None if res.target_rank is None else
            {"before": res.target_rank[0], "after": res.target_rank[1]},
            "certificate": res.certificate,
        }
    target = engine.name_of(spec.target_id) if spec.target_id is not None else None
    return {
        "report": "robret ui attack",
        "index_dir": str(engine.index_dir),
        "gallery_size": len(engine.gallery),
        "rank_depth": engine.depth(),
        "query": {"source": query_label, "query_size": list(query_hw), "work_side": engine.cfg.work_side,
                  "units": f"radii, eps and norms are ℓ2/ℓ∞ over {space or 'the query samples in [0,1]'} (the "
                  "radius robret query states); the attack searched on a copy of side ≤ work_side and was "
                  "measured on the full image"},
        "adversarial_png": "8-bit: rounding moves each pixel by at most 0.5/255 from the float attack reported here",
        "attack": {"kind": spec.kind, "norm": spec.norm, "eps": spec.eps, "steps": spec.steps, "k": spec.k,
                   "target": target},
        "encoders": enc,
    }
