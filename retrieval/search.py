"""Search a gallery and certify the answer (DESIGN.md, "Certificates"; encoder/certify.py).

For a query file whose own samples are x (each scaled to [0,1] by its bit depth, in the file's own
channels, after EXIF orientation, size H×W; encoder/image.py), the gallery's encoder e (L-Lipschitz
at its input) and the preprocessing P = R∘Φ (per-pixel channel conversion Φ with Lipschitz constant c,
then the float resize R; ‖P‖ ≤ c·‖R‖₂ = `encoder.input_norm(size, layout)`): item i stays ranked
above item j for every perturbation δ of x with
    ‖δ‖₂ < (s_i − s_j − slack) / (L·‖e_i − e_j‖·c·‖R‖₂),      s = ⟨e(Px), e_·⟩,
so `encoder.certify.certify_ranked` on the retrieved list, divided by c·‖R‖₂, gives each top-k item's
radius and the top-k set's radius *over the file's own samples*. The slack comes from the encoder's
measured float error (`encoder.certify.slack_for`), recorded in the catalog at build. Files whose
decode is not continuous in their samples (colour keys, palettes, 16-bit samples reduced to 8 bits;
`Pixels.uncertified`) get no radius, and the result says why.

The list is retrieved exhaustively (`exact=True`: also on IVF/HNSW), m = `candidates` long; when
it covers the gallery the certificate is complete, otherwise every unlisted item (float32 score ≤
s_m, hence exact score ≤ s_m + 2·γ_D, `float32_dot_error`) is bounded by
(s_i − s_m − 2γ_D − slack)/(L·(‖e_i‖ + M)) with M the gallery's largest vector norm.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoder.certify import certify_ranked, float32_dot_error, slack_for

__all__ = ["Hit", "SearchResult", "search_image", "search_embedding", "default_candidates"]


def default_candidates(k: int) -> int:
    """List length used to certify a top-k: enough outsiders that the 2L bound rarely binds."""
    return max(2 * k, k + 64)


@dataclass
class Hit:
    rank: int  # 1-based
    id: int  # the gallery's stable id
    score: float  # cosine similarity ⟨e(q), e_i⟩
    path: Path | None
    radius: float | None = None  # stays in the top-k for ‖δ‖₂ < radius (None: no certificate)
    certified: bool | None = None  # radius > eps (None without eps or certificate)


@dataclass
class SearchResult:
    hits: list[Hit]
    k: int
    gallery_size: int
    candidates: int  # length of the exhaustively retrieved list
    complete: bool  # the list covered the whole gallery
    lipschitz: float | None
    set_radius: float | None = None  # the top-k set cannot change for ‖δ‖₂ < set_radius
    order_radius: float | None = None  # nor its order, for ‖δ‖₂ < order_radius
    input_norm: float | None = None  # ‖R‖₂ used to state radii in the query's pixels (1.0: encoder input)
    radius_space: str = "none"  # e.g. "ℓ2 over the file's 1-channel 8-bit samples (L, W×H) scaled to [0,1]" | "encoder input S×S" | "none"
    query_size: tuple[int, int] | None = None  # (height, width) of the query, after EXIF orientation
    eps: float | None = None
    eps_certified: bool | None = None  # set_radius > eps
    pairs_evaluated: int = 0
    notes: list[str] = field(default_factory=list)
    slack: float | None = None  # subtracted from every score margin: the encoder's float error (certify.slack_for)
    values: int | None = None  # how many samples the radii are over (channels × height × width)

    @property
    def certified(self) -> bool:
        return self.set_radius is not None

    def rms255(self, radius: float | None) -> float | None:
        """A radius as the RMS change per sample it allows, in 1/255 units: ℓ2 / √values · 255.

        Comparable across image sizes and modes: "1.0" means every sample may move by one 8-bit grey level.
        """
        if radius is None or not self.values:
            return None
        return radius / math.sqrt(self.values) * 255.0

    def to_dict(self) -> dict:
        def num(x):
            if x is None:
                return None
            return "inf" if math.isinf(x) else float(x)

        return {
            "k": self.k, "gallery_size": self.gallery_size, "candidates": self.candidates,
            "complete": self.complete, "lipschitz": self.lipschitz, "set_radius": num(self.set_radius),
            "order_radius": num(self.order_radius), "input_norm": self.input_norm,
            "radius_space": self.radius_space,
            "query_size": list(self.query_size) if self.query_size else None, "eps": self.eps,
            "eps_certified": self.eps_certified, "pairs_evaluated": self.pairs_evaluated, "notes": self.notes,
            "slack": self.slack, "values": self.values,
            "set_radius_rms255": num(self.rms255(self.set_radius)),
            "order_radius_rms255": num(self.rms255(self.order_radius)),
            "hits": [{"rank": h.rank, "id": h.id, "score": h.score, "path": None if h.path is None else str(h.path),
                      "radius": num(h.radius), "radius_rms255": num(self.rms255(h.radius)),
                      "certified": h.certified} for h in self.hits],
        }


def search_embedding(gallery, query, k: int = 10, *, certify: bool = True, eps: float | None = None,
                     input_norm: float | None = None, candidates: int | None = None,
                     query_size: tuple[int, int] | None = None, radius_space: str | None = None,
                     float_error: float | None = None, exclude=()) -> SearchResult:
    """Top-k for one unit-norm embedding (dim,), certified when the encoder has a Lipschitz bound.

    input_norm: bound on the norm of the map from the user's image samples to the encoder input
    (`encoder.input_norm(size, layout)`); None states the radii at the encoder input (for attacks that
    perturb the encoder input directly). radius_space: what the radii are over, in words.
    float_error: the encoder's float error bound (default: the gallery's, recorded at build).
    exclude: ids left out of the answer and of its certificate (e.g. the query itself): the result is
    the top-k of the gallery without them. Dropping items from the descending list keeps every unlisted
    score below the last listed one, so the certificate stays sound.
    """
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    n = len(gallery)
    dropped = {int(i) for i in exclude}
    k = max(1, min(int(k), n))
    lipschitz = gallery.lipschitz if certify else None
    empty = SearchResult([], 0, 0, 0, True, lipschitz, notes=["the gallery is empty"])
    if n == 0:
        return empty
    if lipschitz is None:
        scores, ids = gallery.search(q[None], k + len(dropped))
        keep = [j for j, i in enumerate(ids[0]) if int(i) >= 0 and int(i) not in dropped][:k]
        if not keep:
            return empty
        k, scores, ids = len(keep), scores[0][keep], ids[0][keep]
        hits = [Hit(r + 1, int(i), float(s), p) for r, (i, s, p) in enumerate(zip(ids, scores, gallery.paths(ids)))]
        notes = [] if certify is False else ["the encoder has no Lipschitz bound: no certificate"]
        return SearchResult(hits, k, n, k, k >= n, None, query_size=query_size, eps=eps, notes=notes)

    m = min(n, max(k, int(candidates or default_candidates(k))) + len(dropped))
    _, ids = gallery.search(q[None], m, exact=True)
    ids = ids[0][ids[0] >= 0]
    complete = len(ids) >= n
    ids = np.asarray([i for i in ids if int(i) not in dropped], dtype=np.int64)
    if len(ids) == 0:
        return empty
    k = min(k, len(ids))
    vectors = gallery.vectors(ids).astype(np.float64)
    scores = vectors @ q.astype(np.float64)
    order = np.argsort(-scores, kind="stable")  # recomputed in float64; ties keep FAISS's order
    ids, vectors, scores = ids[order], vectors[order], scores[order]
    max_norm = float(getattr(gallery, "max_norm", 1.0))
    if float_error is None:
        float_error = getattr(gallery, "float_error", None)
    unlisted = 0.0 if complete else 2 * float32_dot_error(len(q), max_norm, float(np.linalg.norm(q)))
    slack = slack_for(float_error, max_norm)
    cert = certify_ranked(scores, vectors, k, lipschitz, complete=complete, slack=slack, max_norm=max_norm,
                          unlisted_slack=unlisted)
    norm = float(input_norm) if input_norm is not None else 1.0
    cert = cert.scaled(norm)
    paths = gallery.paths(ids[:k])
    hits = []
    for r in range(k):
        radius = float(cert.radius[r])
        hits.append(Hit(r + 1, int(ids[r]), float(scores[r]), paths[r], radius,
                        None if eps is None else bool(radius > eps)))
    if radius_space is not None:
        space = radius_space
    elif input_norm is None:
        side = gallery.encoder_info.get("input_size")
        space = f"encoder input {side}×{side}"
    else:
        size = f" ({query_size[1]}×{query_size[0]})" if query_size else ""  # W×H
        space = f"ℓ2 over the query image's 3-channel RGB samples{size} scaled to [0,1]"
    return SearchResult(
        hits, k, n, len(ids), complete, lipschitz, float(cert.set_radius), float(cert.order_radius), norm, space,
        query_size, eps, None if eps is None else bool(cert.set_radius > eps), int(cert.pairs_evaluated),
        slack=slack)


def search_image(gallery, image, k: int = 10, *, certify: bool = True, eps: float | None = None,
                 candidates: int | None = None, exclude=()) -> SearchResult:
    """Embed a query (file path or PIL image) with the gallery's encoder, search, certify.

    Radii are ℓ2 norms over the file's own samples (each scaled to [0,1] by its bit depth, in the file's
    own channels, EXIF orientation applied; `encoder.image.pixels`), through the encoder's
    `input_norm(size, layout)`: the channel conversion's Lipschitz constant times the exact resize norm.
    A query whose decode is not continuous in its samples gets no radius, with the reason in `notes`.
    """
    from PIL import Image

    from encoder.image import pixels

    if isinstance(image, (str, os.PathLike)):
        px = pixels(gallery.decode(image).image)
    elif isinstance(image, Image.Image):
        px = pixels(image)
    else:
        raise TypeError(f"expected a file path or a PIL image, got {type(image).__name__}")
    enc = gallery.encoder
    q = gallery.embed_images([px])[0]
    size, layout, uncertified, space, channels = px.size, px.layout, px.uncertified, px.describe(), px.channels
    del px  # a query file's decoded image is not held while the certificate is computed
    norm_fn = getattr(enc, "input_norm", None)
    certifiable = certify and uncertified is None
    input_norm = float(norm_fn(size, layout)) if (norm_fn is not None and certifiable) else None
    result = search_embedding(gallery, q, k, certify=certifiable, eps=eps, input_norm=input_norm,
                              candidates=candidates, query_size=size,
                              radius_space=space if input_norm is not None else None, exclude=exclude)
    if input_norm is not None:
        result.values = channels * size[0] * size[1]
    if certify and uncertified is not None and gallery.lipschitz is not None:
        result.notes = [f"no certificate for this file: {uncertified}"]
    elif certify and result.lipschitz is not None and norm_fn is None:
        result.notes.append("the encoder does not report its resize norm: radii are at the encoder input")
    return result
