"""Attack one query against a gallery and report the outcome next to its certificate.

The CLI (`robret attack`, `robret demo`), the UI and the benchmarks all call `attack_query`:

1. the clean query x (the tensor from `query_image`: the user's pixels, radii in its values) is
   searched and certified by retrieval.search.search_embedding, with ‖R‖₂ = ImageEmbedder.input_norm;
2. one attack perturbs exactly x (top-k untargeted or targeted PGD, or AutoAttack on the top-1),
   optimising against the whole gallery or, for large ones, the query's exact top-`pool`;
3. the adversarial x is searched again, and ‖δ‖₂, ‖δ‖∞ are measured on δ = x_adv − x.

The certificate promised: the top-k set cannot change while ‖δ‖₂ < set_radius, and item i cannot
leave it while ‖δ‖₂ < radius_i. The attack broke a promise iff an item whose radius exceeds ‖δ‖₂
left the top-k (in particular iff ‖δ‖₂ < set_radius and the set changed); `CertificateCheck.ok`
is the negation, and must always hold.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder.attack import Callback, PGDConfig
from retrieval.attack_info import AUTOATTACK_CONFIGURATION, QUERY_ATTACKS
from retrieval.search import SearchResult, search_embedding

from ._embed import ImageEmbedder, working_copy
from .autoattack import autoattack_untargeted
from .topk import topk_targeted, topk_untargeted

__all__ = ["QUERY_ATTACKS", "AUTOATTACK_CONFIGURATION", "RankedIds", "rank_moves", "Ranking", "CertificateCheck", "QueryAttackOutcome", "attack_query", "rank_query",
           "attack_candidates", "VectorGallery"]


def _num(x):
    if x is None:
        return None
    return "inf" if np.isinf(x) else float(x)


class RankedIds:
    """A ranked list of gallery ids (`ids`, best first) whose first `k` are the top-k."""

    ids: np.ndarray
    k: int

    @property
    def top(self) -> list[int]:
        return [int(i) for i in self.ids[: self.k]]

    def rank_of(self, item_id: int) -> int | None:
        """1-based rank of `item_id`, None when deeper than the list."""
        hit = np.flatnonzero(self.ids == item_id)
        return int(hit[0]) + 1 if hit.size else None


def rank_moves(before: RankedIds, after: RankedIds) -> list[dict]:
    """Rank moves of every item in either top-k: before and after rank (None = below the list)."""
    return [{"id": i, "before": before.rank_of(i), "after": after.rank_of(i)}
            for i in dict.fromkeys(before.top + after.top)]


@dataclass
class Ranking(RankedIds):
    """One search of one query: the certified top-k (retrieval.search) and the ranked list to `depth`."""

    ids: np.ndarray  # (depth,) gallery ids, best first; the first k exactly as `search` returned them
    scores: np.ndarray  # (depth,) cosine similarities
    search: SearchResult  # the top-k with its certificate (radii over the query tensor's values)
    embedding: np.ndarray  # (D,) the query's unit-norm embedding

    @property
    def k(self) -> int:  # type: ignore[override]
        return self.search.k

    def to_dict(self, paths: dict[int, str] | None = None) -> dict:
        radii = [h.radius for h in self.search.hits]
        rows = []
        for n, (i, s) in enumerate(zip(self.ids[: self.k], self.scores)):
            row = {"rank": n + 1, "id": int(i), "score": float(s)}
            if paths is not None:
                row["path"] = paths.get(int(i))
            if n < len(radii) and radii[n] is not None:
                row["radius"] = _num(radii[n])
                row["radius_rms255"] = _num(self.search.rms255(radii[n]))
            rows.append(row)
        return {"top": rows, "set_radius": _num(self.search.set_radius),
                "set_radius_rms255": _num(self.search.rms255(self.search.set_radius)),
                "order_radius": _num(self.search.order_radius), "radius_space": self.search.radius_space}


def rank_query(gallery, q: np.ndarray, k: int, depth: int | None = None, *, input_norm: float | None = None,
               query_size: tuple[int, int] | None = None, values: int | None = None,
               radius_space: str | None = None, exclude=()) -> Ranking:
    """`search_embedding` for the (certified, when the encoder allows) top-k of the unit-norm query
    embedding q, plus the exhaustive ranked list to `depth` to tell where displaced items went.
    values: how many samples the radii are over (channels·H·W), for SearchResult.rms255.
    exclude: gallery ids left out of both, and of the certificate (`search_embedding`'s exclude)."""
    q = np.asarray(q, dtype=np.float32).reshape(-1)
    exclude = {int(i) for i in exclude}
    res = search_embedding(gallery, q, k, input_norm=input_norm, query_size=query_size, radius_space=radius_space,
                           exclude=exclude)
    res.values = values
    top = [h.id for h in res.hits]
    scores, ids = gallery.search(q[None], max(depth or 0, res.k) + len(exclude), exact=True)
    keep = ids[0] >= 0
    seen = set(top) | exclude
    rest = [(int(i), float(s)) for i, s in zip(ids[0][keep], scores[0][keep]) if int(i) not in seen]
    all_ids = np.array(top + [i for i, _ in rest], dtype=np.int64)
    all_scores = np.array([h.score for h in res.hits] + [s for _, s in rest], dtype=np.float64)
    return Ranking(all_ids, all_scores, res, q)


def attack_candidates(gallery, q: np.ndarray, pool: int | None, extra=(), exclude=()) -> tuple[np.ndarray, np.ndarray]:
    """(gallery ids, unit vectors (n, D)) an attack optimises against: the whole gallery when it holds
    at most `pool` items (or pool is None), else q's exact top-`pool` plus the `extra` ids (a target); never the
    `exclude` ids."""
    exclude = {int(i) for i in exclude}
    if pool is None or len(gallery) - len(exclude) <= pool:
        ids, vectors = gallery.all_vectors()
        keep = ~np.isin(ids, np.fromiter(exclude, np.int64, len(exclude)))
        return ids[keep], vectors[keep]
    _, found = gallery.search(np.asarray(q, dtype=np.float32).reshape(1, -1), pool + len(exclude), exact=True)
    own = [int(i) for i in found[0] if i >= 0 and int(i) not in exclude][:pool]
    own += [int(i) for i in extra if int(i) not in own and int(i) not in exclude]
    ids = np.array(own, dtype=np.int64)
    return ids, gallery.vectors(ids)


@dataclass
class CertificateCheck:
    """Did the change stay within what the clean query's certificate allowed?"""

    set_radius: float  # the clean top-k set cannot change for ‖δ‖₂ < set_radius
    delta_l2: float  # ‖δ‖₂ of the attack
    within_radius: bool  # delta_l2 < set_radius
    set_changed: bool  # the adversarial top-k set differs from the clean one
    guaranteed_items: list[int]  # clean top-k items whose own radius exceeds ‖δ‖₂
    violated_items: list[int]  # guaranteed items that left the top-k anyway (must be empty)

    @property
    def ok(self) -> bool:
        """The attack broke nothing the certificate promised."""
        return not self.violated_items

    @property
    def verdict(self) -> str:
        if self.violated_items:
            return "VIOLATED: an item certified to stay left the top-k"
        if self.within_radius:
            return "held: ‖δ‖₂ is inside the certified radius, so the top-k set could not change and did not"
        if not self.set_changed:
            return ("allowed: ‖δ‖₂ exceeds the certified radius, so a change was possible; "
                    "the top-k set still did not change")
        if self.guaranteed_items:
            return ("allowed: ‖δ‖₂ exceeds the certified radius, so the change was not excluded; "
                    f"the {len(self.guaranteed_items)} item(s) whose own radius exceeds ‖δ‖₂ all stayed")
        return "allowed: ‖δ‖₂ exceeds every item's certified radius, so nothing was guaranteed at this size"

    @classmethod
    def of(cls, before: Ranking, after: Ranking, delta_l2: float) -> "CertificateCheck":
        top_after = set(after.top)
        guaranteed = [i for i, h in zip(before.top, before.search.hits) if delta_l2 < h.radius]
        return cls(float(before.search.set_radius), float(delta_l2), bool(delta_l2 < before.search.set_radius),
                   set(before.top) != top_after, guaranteed, [i for i in guaranteed if i not in top_after])

    def to_dict(self) -> dict:
        return {"set_radius": _num(self.set_radius), "delta_l2": self.delta_l2, "within_radius": self.within_radius,
                "set_changed": self.set_changed, "guaranteed_items": self.guaranteed_items,
                "violated_items": self.violated_items, "ok": self.ok, "verdict": self.verdict}


@dataclass
class QueryAttackOutcome:
    """What one attack did to one query's top-k, next to the clean query's certificate."""

    kind: str  # a key of QUERY_ATTACKS
    config: PGDConfig  # norm, ε (over the query tensor's values) and steps
    encoder: str  # the encoder's name
    x_adv: torch.Tensor  # (3, H, W) the adversarial query tensor
    before: Ranking  # the clean query
    after: Ranking  # the adversarial query
    delta_l2: float  # ‖x_adv − x‖₂
    delta_linf: float  # ‖x_adv − x‖∞
    certificate: CertificateCheck | None  # None: the encoder has no Lipschitz bound
    target: int | None = None  # gallery id of a targeted attack
    target_rank: tuple[int | None, int | None] | None = None  # (before, after), None = deeper than the list
    target_score: tuple[float, float] | None = None  # its cosine similarity before and after
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.before.k

    @property
    def overlap(self) -> float:
        """overlap@k = |top-k before ∩ top-k after| / k."""
        return len(set(self.before.top) & set(self.after.top)) / self.k

    @property
    def success(self) -> bool:
        """Untargeted: no clean top-k item is left; targeted: the target is in the top-k; AutoAttack: the
        top-1 moved."""
        if self.kind == "targeted":
            return self.target in self.after.top
        if self.kind == "autoattack":
            return self.before.top[0] != self.after.top[0]
        return self.overlap == 0

    def moves(self) -> list[dict]:
        return rank_moves(self.before, self.after)

    def rms255(self, l2: float | None) -> float | None:
        """An ℓ2 norm over the query's samples as the RMS change per sample, in 1/255: ℓ2/√(C·H·W)·255."""
        return None if l2 is None else l2 / math.sqrt(self.x_adv.numel()) * 255.0

    def to_dict(self, paths: dict[int, str] | None = None) -> dict:
        """JSON-ready; `paths` (id → display name) adds a path to each listed item."""
        return {
            "kind": self.kind, "attack": self.config.to_dict(), "encoder": self.encoder, "k": self.k,
            "configuration": AUTOATTACK_CONFIGURATION if self.kind == "autoattack" else QUERY_ATTACKS[self.kind],
            "query_size": list(self.x_adv.shape[-2:]), "delta_l2": self.delta_l2,
            "delta_l2_rms255": _num(self.rms255(self.delta_l2)), "delta_linf": self.delta_linf,
            "overlap_at_k": self.overlap, "success": self.success, "before": self.before.to_dict(paths),
            "after": self.after.to_dict(paths), "moves": self.moves(),
            "certificate": None if self.certificate is None else self.certificate.to_dict(),
            "target": self.target,
            "target_rank": None if self.target_rank is None else dict(zip(("before", "after"), self.target_rank)),
            "target_score": None if self.target_score is None else dict(zip(("before", "after"), self.target_score)),
            "seconds": self.seconds, "notes": self.notes,
        }


def attack_query(gallery, x: torch.Tensor, *, kind: str = "untargeted", config: PGDConfig | None = None,
                 k: int = 5, target: int | None = None, target_rank: int | None = None, embedder: ImageEmbedder | None = None,
                 pool: int | None = None, depth: int | None = None, callback: Callback | None = None,
                 generator: torch.Generator | None = None, seed: int = 0, layout: str = "RGB",
                 work_side: int | None = None, radius_space: str | None = None, exclude=()) -> QueryAttackOutcome:
    """Attack the query tensor x against `gallery` and report the outcome next to its certificate.

    gallery: an index.Gallery (or VectorGallery): search/vectors/all_vectors/paths and `lipschitz`;
    x: (C, H, W) or (1, C, H, W) float in [0, 1], the exact tensor perturbed (see `query_image`), in
    `layout`'s channels (the file's own samples; RGB by default);
    kind: "untargeted" | "targeted" (needs `target`, a gallery id, or `target_rank`, the 1-based clean
    rank of the item to bring into the top-k) | "autoattack" (APGD-CE + APGD-DLR,
    config.steps iterations); config: norm and ε over x's values (default ℓ2, ε = 0.5, 50 steps);
    embedder: the differentiable image → embedding map (default ImageEmbedder(gallery.encoder, layout=layout));
    pool: optimise against at most this many items (the query's exact neighbours) on large galleries;
    depth: how far the before/after lists go (≥ k) to report where displaced items went;
    work_side: when x's longest side exceeds it, the attack searches on a copy shrunk to it (for speed)
    and the original is perturbed as the copy was, inside the same threat set (`WorkingCopy`): the
    rankings, ‖δ‖ and the certificate are always those of x itself, through the same map as
    `robret query` (retrieval.search.search_image), so its radius is the one `robret query` states;
    radius_space: what the radii are over, in words (e.g. QueryImage.space);
    exclude: gallery ids the attack, the rankings and the certificate leave out (the page's comparison index drops
    the files its primary gallery does not hold).
    """
    if kind not in QUERY_ATTACKS:
        raise ValueError(f"unknown attack kind {kind!r}; known: {', '.join(QUERY_ATTACKS)}")
    if kind == "targeted" and (target is None) == (target_rank is None):
        raise ValueError("a targeted attack needs a target gallery id or a target rank (one of them)")
    n = len(gallery) - len(set(int(i) for i in exclude))
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be between 1 and the gallery size − 1 ({n - 1})")
    if target_rank is not None and not 1 <= target_rank <= n:
        raise ValueError(f"the target rank must be in 1..{n}")
    config = config or PGDConfig(norm="l2", eps=0.5, steps=50)
    emb = embedder if embedder is not None else ImageEmbedder(gallery.encoder, layout=layout)
    x = (x[None] if x.dim() == 3 else x).detach().to(emb.device, torch.float32)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one (C, H, W) query, got {tuple(x.shape)}")
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    input_norm = emb.input_norm(hw) if gallery.lipschitz is not None else None
    t0 = time.perf_counter()
    depth = max(depth or k, target_rank or 0)
    ranked = dict(input_norm=input_norm, query_size=hw, values=int(x[0].numel()), radius_space=radius_space,
                  exclude=exclude)
    before = rank_query(gallery, emb.embed(x)[0].cpu().numpy(), k, depth, **ranked)
    if target_rank is not None:
        target = int(before.ids[target_rank - 1])
    ids, vectors = attack_candidates(gallery, before.embedding, pool, () if target is None else (target,), exclude)
    g = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(emb.device)
    kk = min(k, len(ids) - 1)
    copy = working_copy(x, work_side)
    x_run, run_config = x, config
    if copy is not None:
        eps_w = copy.budget(config.norm, config.eps)
        step = None if config.step is None else config.step * eps_w / max(config.eps, 1e-300)
        x_run, run_config = copy.x, config.replace(eps=eps_w, step=step)
    x_adv = _run_attack(kind, emb, x_run, g, ids, target, kk, run_config, callback, generator, seed)
    if copy is not None:
        x_adv = copy.lift(x, x_adv, config.norm, config.eps)
    x_adv = x_adv.detach()
    after = rank_query(gallery, emb.embed(x_adv)[0].cpu().numpy(), k, depth, **ranked)
    delta = (x_adv - x).flatten()
    d2, dinf = float(delta.norm()), float(delta.abs().max())
    notes = list(before.search.notes) + ([copy.describe()] if copy is not None else [])
    out = QueryAttackOutcome(kind, config, emb.name, x_adv[0].cpu(), before, after, d2, dinf,
                             CertificateCheck.of(before, after, d2) if before.search.certified else None,
                             notes=notes)
    if target is not None:
        t = gallery.vectors(np.array([target], dtype=np.int64))[0].astype(np.float64)
        out.target = int(target)
        out.target_rank = (before.rank_of(target), after.rank_of(target))
        out.target_score = (float(before.embedding @ t), float(after.embedding @ t))
    out.seconds = time.perf_counter() - t0
    return out


def _run_attack(kind, emb, x, g, ids, target, kk, config, callback, generator, seed) -> torch.Tensor:
    """The adversarial x of one attack kind against the candidate vectors g (ids), in x's own threat set."""
    if kind == "autoattack":
        x_adv, _ = autoattack_untargeted(emb, x, g, norm=config.norm, eps=config.eps, version="custom",
                                         attacks=["apgd-ce", "apgd-dlr"], n_iter=config.steps, seed=seed,
                                         callback=callback)
    elif kind == "untargeted":
        x_adv = topk_untargeted(emb, x, g, k=kk, config=config, callback=callback, generator=generator).x_adv
    else:
        hit = np.flatnonzero(ids == target)
        if hit.size == 0:
            raise ValueError(f"the target {target} is not in the gallery")
        x_adv = topk_targeted(emb, x, g, int(hit[0]), k=kk, config=config, callback=callback,
                              generator=generator).x_adv
    return x_adv


class VectorGallery:
    """An in-memory gallery of unit-norm vectors with the interface `attack_query` and
    retrieval.search use (exact inner-product search), for benchmarks over embedded datasets."""

    def __init__(self, vectors, lipschitz: float | None, input_size: int | None = None, names=None,
                 float_error: float | None = None):
        self._v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        self.lipschitz = lipschitz
        self.float_error = float_error  # the embedding's float error (certificates' slack); None: the default slack
        self.max_norm = float(np.linalg.norm(self._v.astype(np.float64), axis=1).max()) if len(self._v) else 1.0
        self.encoder_info = {"input_size": input_size}
        self._names = names

    def __len__(self) -> int:
        return self._v.shape[0]

    def search(self, queries, k: int, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(queries, dtype=np.float32) @ self._v.T
        k = min(k, len(self))
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, ids, 1), ids.astype(np.int64)

    def vectors(self, ids) -> np.ndarray:
        return self._v[np.asarray(ids, dtype=np.int64)]

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(len(self), dtype=np.int64), self._v

    def paths(self, ids) -> list:
        return [None if self._names is None else self._names[int(i)] for i in ids]
