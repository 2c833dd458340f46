"""Near-duplicate groups of an indexed gallery, from its stored vectors, with certified verdicts.

The reference experience is imagededup's `find_duplicates` (a score threshold on encodings, groups
of files that are duplicates of each other); here the score is the gallery's cosine similarity
s = ⟨e_a, e_b⟩ of stored unit vectors and the verdict of a pair is "duplicate" iff s ≥ T.

1. Exact duplicates: files with the same content SHA-256 (from the catalog) are paired first.
2. Near duplicates: every pair with s ≥ T, found with an exact FAISS range search over the stored
   vectors (IndexFlatIP, float32, radius T − RANGE_MARGIN so no pair at T is lost to rounding); the
   verdict itself is decided on s recomputed in float64 from the stored float32 vectors.
3. Groups: connected components of the graph of duplicate pairs (scipy.sparse.csgraph).

Certified verdicts (`pair_radius`). Threat model: each of the two images may be perturbed by δ_a,
δ_b with ‖δ_a‖₂, ‖δ_b‖₂ ≤ E over its own decoded samples in [0, 1] (whichever channel layout it has),
simultaneously (so in particular either one alone). Let e be the encoder (L-Lipschitz at its input,
unit-norm outputs), P_a the preprocessing of image a (channel conversion to RGB, then the float
resize), ‖P_a‖ ≤ n_a := c_max·‖R_a‖₂ (encoder.preprocess.input_norm: ‖R_a‖₂ the exact resize norm for
a's height×width, c_max the largest channel-conversion constant over every layout, since the catalog
does not record a file's layout). Then ‖e(P_a(a + δ_a)) − e(P_a a)‖ ≤ L·n_a·E, and with ‖e‖ = 1,

    |s' − s| = |⟨e_a', e_b'⟩ − ⟨e_a, e_b⟩| ≤ |⟨e_a' − e_a, e_b'⟩| + |⟨e_a, e_b' − e_b⟩|
             ≤ ‖e_a' − e_a‖·‖e_b'‖ + ‖e_a‖·‖e_b' − e_b‖ ≤ L·E·(n_a + n_b).

Float error: stored and recomputed vectors are float32 embeddings ê = e + err, ‖err‖ ≤ γ (the encoder's
measured float error, recorded at build), ‖ê‖ ≤ M (M ≥ 1: the gallery's largest stored norm, at least
1). The computed score ŝ = ⟨ê_a, ê_b⟩ satisfies |ŝ − s| ≤ |⟨err_a, e_b⟩| + |⟨ê_a, err_b⟩| ≤ γ(1 + M), the
same for ŝ' and s', so |ŝ' − ŝ| ≤ L·E·(n_a + n_b) + 2γ(1 + M) ≤ L·E·(n_a + n_b) + slack with
slack = encoder.certify.slack_for(γ, M) = 4γM + 1e-9 ≥ 2γ(1 + M) for M ≥ 1. Hence the verdict
(ŝ ≥ T or ŝ < T) cannot change while

    E < radius = (|ŝ − T| − slack) / (L·(n_a + n_b)),

and a pair is certified at E iff radius > E. Pairs not listed have ŝ < T; every one of them is a
certified non-duplicate at E unless T − ŝ ≤ L·E·2·n_max + slack (n_max over the gallery): those are
listed as `near_misses` with their own radius, so every verdict the report does not list is
certified too. Encoders without a Lipschitz bound certify nothing (radius None).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from encoder.certify import slack_for
from encoder.image import LAYOUT_CHANNELS, channel_lipschitz
from encoder.preprocess import resize_operator_norm

__all__ = ["DedupPair", "DedupReport", "find_duplicates", "pair_radius", "worst_channel_lipschitz", "RANGE_MARGIN"]

RANGE_MARGIN = 1e-5  # float32 range search radius below T: covers its rounding (≤ ~1e-6 for D ≤ 4096)


def worst_channel_lipschitz() -> float:
    """c_max: the largest channel-conversion Lipschitz constant over every layout robret decodes."""
    return max(channel_lipschitz(layout) for layout in LAYOUT_CHANNELS)


def pair_radius(score: float, threshold: float, lipschitz: float, norm_a: float, norm_b: float,
                slack: float) -> float:
    """The largest E for which the pair's verdict (score ≥ threshold or not) is certified against
    perturbations of both images, each of ℓ2 norm < E over its own samples (module doc):

        radius = max(0, |s − T| − slack) / (L·(n_a + n_b)).
    """
    return max(0.0, abs(score - threshold) - slack) / (lipschitz * (norm_a + norm_b))


@dataclass
class DedupPair:
    a: int  # gallery ids, a < b
    b: int
    score: float  # cosine similarity, float64 from the stored vectors
    exact: bool  # same content SHA-256
    duplicate: bool  # score ≥ threshold (always True for exact duplicates listed as such)
    radius: float | None = None  # the verdict holds for every perturbation of each image with ‖δ‖₂ < radius
    certified: bool | None = None  # radius > certify_eps (None without certify_eps or without a bound)


@dataclass
class DedupReport:
    threshold: float
    certify_eps: float | None
    lipschitz: float | None
    gallery_size: int
    groups: list[list[int]]  # ids of each group (size ≥ 2), largest first
    pairs: list[DedupPair]  # every duplicate pair (exact first, then by decreasing score)
    near_misses: list[DedupPair] = field(default_factory=list)  # non-duplicates not certified at certify_eps
    slack: float | None = None
    channel_lipschitz: float | None = None  # c_max used in every n_a
    paths: dict[int, str] = field(default_factory=dict)  # id → path relative to the indexed root
    hashes: dict[int, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        def num(x):
            return None if x is None else ("inf" if math.isinf(x) else float(x))

        def pair(p: DedupPair) -> dict:
            return {"a": p.a, "b": p.b, "a_path": self.paths.get(p.a), "b_path": self.paths.get(p.b),
                    "score": p.score, "exact": p.exact, "duplicate": p.duplicate, "radius": num(p.radius),
                    "certified": p.certified}

        return {
            "threshold": self.threshold, "certify_eps": self.certify_eps, "lipschitz": self.lipschitz,
            "gallery_size": self.gallery_size, "slack": self.slack, "channel_lipschitz": self.channel_lipschitz,
            "certificate": ("radius: the pair's verdict (duplicate iff score ≥ threshold) holds for every "
                            "perturbation of both images, each of ℓ2 norm < radius over its own samples in [0,1]; "
                            "pairs not listed in pairs or near_misses are non-duplicates certified at certify_eps")
            if self.lipschitz is not None else "no Lipschitz bound: nothing is certified",
            "groups": [[{"id": i, "path": self.paths.get(i), "sha256": self.hashes.get(i)} for i in g]
                       for g in self.groups],
            "pairs": [pair(p) for p in self.pairs],
            "near_misses": [pair(p) for p in self.near_misses],
        }

    def to_csv(self) -> str:
        """One row per listed pair: group (index into groups; empty for near misses), ids, paths, score, verdicts."""
        group_of = {i: n for n, g in enumerate(self.groups) for i in g}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["group", "a", "b", "a_path", "b_path", "score", "exact", "duplicate", "radius", "certified"])
        for p in self.pairs + self.near_misses:
            w.writerow([group_of.get(p.a, "") if p.duplicate else "", p.a, p.b, self.paths.get(p.a),
                        self.paths.get(p.b), f"{p.score:.9g}", p.exact, p.duplicate,
                        "" if p.radius is None else f"{p.radius:.9g}", "" if p.certified is None else p.certified])
        return buf.getvalue()


def _range_pairs(vectors: np.ndarray, radius: float, block: int = 4096) -> set[tuple[int, int]]:
    """Position pairs (i < j) with float32 inner product ≥ radius: FAISS exact range search."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    found: set[tuple[int, int]] = set()
    for start in range(0, len(vectors), block):
        lims, _, labels = index.range_search(vectors[start:start + block], float(radius))
        for r in range(len(lims) - 1):
            i = start + r
            found.update((i, int(j)) for j in labels[lims[r]:lims[r + 1]] if int(j) > i)
    return found


def find_duplicates(gallery, threshold: float = 0.9, certify_eps: float | None = None) -> DedupReport:
    """Exact and near-duplicate pairs and groups of an opened index.Gallery (module doc).

    threshold: T in [−1, 1], a pair is a duplicate iff its cosine similarity s ≥ T;
    certify_eps: E ≥ 0 (ℓ2 over each image's own [0,1] samples) at which each verdict is checked.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the threshold {threshold} must be a cosine similarity in [-1, 1]")
    ids, vectors = gallery.all_vectors()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(ids)
    records = gallery.records(ids)
    paths = {int(i): (r.path if r is not None else None) for i, r in zip(ids, records)}
    hashes = {int(i): (r.content_hash if r is not None else None) for i, r in zip(ids, records)}
    v64 = vectors.astype(np.float64)

    exact: set[tuple[int, int]] = set()
    by_hash: dict[str, list[int]] = {}
    for pos, r in enumerate(records):
        if r is not None and r.content_hash:
            by_hash.setdefault(r.content_hash, []).append(pos)
    for members in by_hash.values():
        exact.update((a, b) for x, a in enumerate(members) for b in members[x + 1:])
    near = {(i, j) for i, j in _range_pairs(vectors, threshold - RANGE_MARGIN) if float(v64[i] @ v64[j]) >= threshold}
    dup_positions = exact | near

    lipschitz = gallery.lipschitz
    c_max = worst_channel_lipschitz()
    slack = norms = None
    if lipschitz is not None:
        size = int(gallery.encoder_info["input_size"])
        slack = slack_for(gallery.float_error, max(1.0, float(gallery.max_norm)))
        norms = np.array([c_max * resize_operator_norm((int(r.height), int(r.width)), (size, size))
                          if r is not None and r.width and r.height else math.inf for r in records])

    def make(i: int, j: int, is_exact: bool) -> DedupPair:
        s = float(v64[i] @ v64[j])
        p = DedupPair(int(ids[i]), int(ids[j]), s, is_exact, is_exact or s >= threshold)
        if lipschitz is not None:
            p.radius = pair_radius(s, threshold, lipschitz, norms[i], norms[j], slack)
            if p.duplicate and s < threshold:  # same content yet below T: a perturbed copy is judged by its score
                p.radius = 0.0
            p.certified = None if certify_eps is None else bool(p.radius > certify_eps)
        return p

    pairs = [make(i, j, (i, j) in exact) for i, j in dup_positions]
    pairs.sort(key=lambda p: (not p.exact, -p.score, p.a, p.b))
    near_misses: list[DedupPair] = []
    if lipschitz is not None and certify_eps is not None and n > 1:
        window = lipschitz * certify_eps * 2 * float(np.max(norms)) + slack
        low = max(-1.0, threshold - window)
        candidates = _range_pairs(vectors, low - RANGE_MARGIN) - dup_positions
        near_misses = [p for p in (make(i, j, False) for i, j in candidates) if not p.certified]
        near_misses.sort(key=lambda p: (-p.score, p.a, p.b))

    groups: list[list[int]] = []
    if dup_positions:
        rows, cols = zip(*dup_positions)
        graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
        _, label = connected_components(graph, directed=False)
        members: dict[int, list[int]] = {}
        for pos in sorted({p for pair in dup_positions for p in pair}):
            members.setdefault(int(label[pos]), []).append(int(ids[pos]))
        groups = sorted(members.values(), key=lambda g: (-len(g), paths.get(g[0]) or ""))
    return DedupReport(threshold, certify_eps, lipschitz, n, groups, pairs, near_misses, slack,
                       c_max if lipschitz is not None else None, paths, hashes)
