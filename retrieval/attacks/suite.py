"""robrank's ERS evaluation on a whole query set: nine attacks, ten scores, one number.

Profile `rob224` of robrank (used for the CVPR 2022 ERS tables): every attack ℓ∞, ε = 8/255,
α = 3/255, 32 PGD steps, W = M = 1; CA± perturb gallery images, the others perturb queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..metrics import ERS_KEYS, ers, ers_normalize
from ._embed import as_embedder, as_tensor
from encoder.attack import ROBRANK_LINF, PGDConfig
from .ranking import run_attack

__all__ = ["SuiteResult", "robrank_suite", "SUITE_ATTACKS"]

# attack → (score key(s) in ERS_KEYS, the AttackResult.after entry each reads)
SUITE_ATTACKS: dict[str, tuple[tuple[str, str], ...]] = {
    "CA+": (("CA+", "prank"),),
    "CA-": (("CA-", "prank"),),
    "QA+": (("QA+", "prank"),),
    "QA-": (("QA-", "prank"),),
    "TMA": (("TMA", "cosine"),),
    "ES": (("ES:D", "shift"), ("ES:R", "recall@1")),
    "LTM": (("LTM", "recall@1"),),
    "GTM": (("GTM", "recall@1"),),
    "GTT": (("GTT", "retain@4"),),
}


@dataclass
class SuiteResult:
    scores: dict[str, float]  # robrank's raw ten scores after attack
    clean: dict[str, float]  # the same measurements on clean inputs
    normalized: dict[str, float]  # ers_normalize(scores)
    ers: float
    config: PGDConfig
    counts: dict[str, int] = field(default_factory=dict)  # images attacked per attack

    def to_dict(self) -> dict:
        return {"scores": self.scores, "clean": self.clean, "normalized": self.normalized, "ers": self.ers,
                "config": self.config.to_dict(), "counts": self.counts}


def robrank_suite(encoder, queries, query_labels, gallery_images, gallery_labels, *, query_self_index=None,
                  candidates=None, config: PGDConfig = ROBRANK_LINF, seed: int = 0, batch_size: int = 32,
                  attacks=tuple(SUITE_ATTACKS), progress: Callable[[str, int, int], None] | None = None
                  ) -> SuiteResult:
    """Run robrank's suite and compute ERS.

    queries (Q, 3, H, W), gallery_images (N, 3, H, W) in [0, 1]; labels are integer classes;
    query_self_index: each query's position in the gallery or −1; candidates: gallery indices whose
    images CA± perturb (default: the first min(Q, N) items of a seeded permutation).
    `progress(attack, done, total)` is called after each batch.
    """
    emb = as_embedder(encoder)
    queries = as_tensor(queries)
    gallery_images = as_tensor(gallery_images)
    gallery = emb.embed(gallery_images)
    ql = as_tensor(query_labels, None, None).long()
    gl = as_tensor(gallery_labels, None, None).long()
    n, q = gallery.shape[0], queries.shape[0]
    qsi = torch.full((q,), -1, dtype=torch.long) if query_self_index is None else \
        as_tensor(query_self_index, None, None).long()
    gen = torch.Generator().manual_seed(seed)
    if candidates is None:
        candidates = torch.randperm(n, generator=gen)[:min(q, n)]
    candidates = as_tensor(candidates, None, None).long()

    scores, clean, counts = {}, {}, {}
    for name in attacks:
        if name in ("CA+", "CA-"):
            xs, labels, self_index = gallery_images[candidates], gl[candidates], candidates
        else:
            xs, labels, self_index = queries, ql, qsi
        total = xs.shape[0]
        sums_after: dict[str, float] = {}
        sums_before: dict[str, float] = {}
        for start in range(0, total, batch_size):
            sl = slice(start, min(total, start + batch_size))
            res = run_attack(name, emb, xs[sl], gallery, labels[sl], gl, self_index=self_index[sl],
                             config=config, generator=gen)
            m = sl.stop - sl.start
            for key, value in res.after.items():
                sums_after[key] = sums_after.get(key, 0.0) + value * m
            for key, value in res.before.items():
                sums_before[key] = sums_before.get(key, 0.0) + value * m
            if progress is not None:
                progress(name, sl.stop, total)
        counts[name] = total
        for score_key, entry in SUITE_ATTACKS[name]:
            scores[score_key] = sums_after[entry] / total
            clean[score_key] = sums_before[entry] / total
    if all(k in scores for k in ERS_KEYS):
        normalized, value = ers_normalize(scores), ers(scores)
    else:
        normalized, value = {}, float("nan")
    return SuiteResult(scores, clean, normalized, value, config, counts)
