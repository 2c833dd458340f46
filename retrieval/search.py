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
s_m, hence exact score ≤ B = s_m + 2·γ_D, `float32_dot_error`) is bounded by
`encoder.certify.unlisted_radius` at B (where an item scoring at most B with norm at most M can lie; never
below (s_i − B − slack)/(L·(‖e_i‖ + M))), M the gallery's largest vector norm.
Once a long-lived process has built the gallery's int8 codes (`Gallery.prepare_search`), certified queries scan
those instead (`retrieval.quantized_search`: a proved upper bound on every score, exact scores only where
they can matter) and get the exhaustive certificate from a quarter of the bytes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from encoder.certify import ARITHMETIC_SLACK, certify_ranked, float32_dot_error, slack_for
from index.scan import shown_path

from .ivf_search import certified_ivf_search
from .quantized_search import certified_quantized_search
from .schema import SCHEMA_VERSION

__all__ = ["Hit", "SearchResult", "PreparedQuery", "reduce_query", "prepare_query", "search_image", "search_images",
           "search_embedding", "default_candidates", "result_document"]


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
    method: str = "exhaustive"  # "exhaustive" (every item scored) | "certified-ivf" (retrieval/ivf_search.py)
    # | "quantized" (int8 codes scanned, retrieval/quantized_search.py)
    exact_topk: bool | None = None  # proved: no item outside the top-k scores above the k-th (certified paths)
    exhaustive: bool | None = None  # proved: the radii equal the exhaustive certificate's
    lists_visited: int | None = None  # certified IVF: inverted lists scanned
    vectors_scanned: int | None = None  # certified IVF: items scored; quantized: codes scanned

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

    def ties(self) -> list[str]:
        """Zero radii explained in words: a radius is 0 when two scores are equal within the encoder's float
        error (`slack`), i.e. the two items tie and an arbitrarily small change of the query may swap them."""
        if self.set_radius is None:
            return []
        said = []
        tied = [h.rank for h in self.hits if h.radius is not None and h.radius <= 0]
        if tied:
            which = ", ".join(f"#{r}" for r in tied)
            said.append(f"rank{'s' if len(tied) > 1 else ''} {which} tie{'' if len(tied) > 1 else 's'} with an "
                        f"item outside the top-{self.k} (equal scores within the float error {self.slack:.2g}): any "
                        f"change of the query, however small, may swap them, so the top-{self.k} set is not "
                        "certified")
        if self.order_radius is not None and self.order_radius <= 0 < self.set_radius:
            said.append(f"two consecutive results tie (equal scores within the float error): their order may swap "
                        f"under any change of the query; the top-{self.k} set itself is certified")
        return said

    def to_dict(self) -> dict:
        """The result as JSON-ready data (every field is documented in docs/json.md)."""
        def num(x):
            if x is None:
                return None
            return "inf" if math.isinf(x) else float(x)

        return {
            "schema": SCHEMA_VERSION, "k": self.k, "gallery_size": self.gallery_size, "candidates": self.candidates,
            "complete": self.complete, "lipschitz": self.lipschitz, "set_radius": num(self.set_radius),
            "order_radius": num(self.order_radius), "input_norm": self.input_norm,
            "radius_space": self.radius_space,
            "query_size": list(self.query_size) if self.query_size else None, "eps": self.eps,
            "eps_certified": self.eps_certified, "pairs_evaluated": self.pairs_evaluated, "notes": self.notes,
            "slack": self.slack, "values": self.values, "method": self.method, "exact_topk": self.exact_topk,
            "exhaustive": self.exhaustive, "lists_visited": self.lists_visited, "vectors_scanned": self.vectors_scanned,
            "set_radius_rms255": num(self.rms255(self.set_radius)),
            "order_radius_rms255": num(self.rms255(self.order_radius)), "ties": self.ties(),
            "hits": [{"rank": h.rank, "id": h.id, "score": h.score,
                      "path": None if h.path is None else shown_path(h.path),
                      "radius": num(h.radius), "radius_rms255": num(self.rms255(h.radius)),
                      "certified": h.certified} for h in self.hits],
        }


def result_document(result: SearchResult, query: dict, gallery) -> dict:
    """One query's JSON document, as `robret query --json` and the HTTP service print it (docs/json.md):
    `query` (what was searched), `encoder`, `index_version`, then `SearchResult.to_dict()` (with `schema`)."""
    body = result.to_dict()
    return {"schema": body.pop("schema"), "query": query, "encoder": gallery.encoder_spec,
            "index_version": gallery.version, **body}


def search_embedding(gallery, query, k: int = 10, *, certify: bool = True, eps: float | None = None,
                     input_norm: float | None = None, candidates: int | None = None,
                     query_size: tuple[int, int] | None = None, radius_space: str | None = None,
                     float_error: float | None = None, exclude=(), probe_budget: int | None = None) -> SearchResult:
    """Top-k for one unit-norm embedding (dim,), certified when the encoder has a Lipschitz bound.

    input_norm: bound on the norm of the map from the user's image samples to the encoder input
    (`encoder.input_norm(size, layout)`); None states the radii at the encoder input (for attacks that
    perturb the encoder input directly). radius_space: what the radii are over, in words.
    float_error: the encoder's float error bound (default: the gallery's, recorded at build).
    exclude: ids left out of the answer and of its certificate (e.g. the query itself): the result is
    the top-k of the gallery without them. Dropping items from the descending list keeps every unlisted
    score below the last listed one, so the certificate stays sound.
    On a gallery with certified inverted lists (`gallery.certified_ivf`, IVF index types) the certificate
    comes from `retrieval.ivf_search.certified_ivf_search`: equal to the exhaustive one (`exhaustive`),
    or, when `probe_budget` lists were visited first or the exactly scored list reached its limit
    (`DEFAULT_CAP_MAX` items; a query that is itself a gallery item), sound and possibly smaller (and a
    note says so).
    Without a certificate (no Lipschitz bound) an IVF gallery visits at most `probe_budget` lists (default:
    the index's nprobe) by decreasing bound, and `exact_topk` says whether the bounds prove the top-k exact.
    """
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    n = len(gallery)
    dropped = {int(i) for i in exclude}
    k = max(1, min(int(k), n))
    lipschitz = gallery.lipschitz if certify else None
    empty = SearchResult([], 0, 0, 0, True, lipschitz, notes=["the gallery is empty"])
    if n == 0:
        return empty
    ivf = getattr(gallery, "certified_ivf", None)
    if lipschitz is None and ivf is not None:  # plain top-k on IVF: the index's nprobe lists, flagged when proved exact
        if probe_budget is None:
            probe_budget = getattr(getattr(gallery, "store", None), "params", {}).get("nprobe")
        found = certified_ivf_search(ivf, q, k, 1.0, slack=0.0, probe_budget=probe_budget, exclude=dropped,
                                     radii=False)
        if found is None:
            return empty
        ids, scores = found.ids, found.cert.scores
        hits = [Hit(r + 1, int(i), float(s), p) for r, (i, s, p) in enumerate(zip(ids, scores, gallery.paths(ids)))]
        notes = [] if certify is False else ["the encoder has no Lipschitz bound: no certificate"]
        if not found.exact_topk:
            notes.append(f"probe budget reached ({found.lists_visited} of {ivf.nlist} lists): the top-{len(ids)} "
                         "may miss better items")
        return SearchResult(hits, len(ids), n, len(found.listed_ids), found.bound == -np.inf, None, query_size=query_size,
                            eps=eps, notes=notes, method="certified-ivf", exact_topk=found.exact_topk,
                            lists_visited=found.lists_visited, vectors_scanned=found.vectors_scanned)
    if lipschitz is None:
        scores, ids = gallery.search(q[None], k + len(dropped))
        keep = [j for j, i in enumerate(ids[0]) if int(i) >= 0 and int(i) not in dropped][:k]
        if not keep:
            return empty
        k, scores, ids = len(keep), scores[0][keep], ids[0][keep]
        hits = [Hit(r + 1, int(i), float(s), p) for r, (i, s, p) in enumerate(zip(ids, scores, gallery.paths(ids)))]
        notes = [] if certify is False else ["the encoder has no Lipschitz bound: no certificate"]
        return SearchResult(hits, k, n, k, k >= n, None, query_size=query_size, eps=eps, notes=notes)

    codes = getattr(gallery, "quantized", None)  # int8 codes, when built (`Gallery.prepare_search`)
    if codes is not None and not codes.covers(q):  # (a query far outside unit scale: the exact scan answers)
        codes = None
    max_norm = codes.max_norm if codes is not None else float(getattr(gallery, "max_norm", 1.0))
    if float_error is None:
        float_error = getattr(gallery, "float_error", None)
    slack = slack_for(float_error, max_norm)
    extra: dict = {}
    if codes is not None or ivf is not None:
        if codes is not None:  # a scan of int8 codes: the exhaustive certificate, exact scores only where they matter
            found = certified_quantized_search(codes, gallery.vectors, q, k, lipschitz, slack=slack,
                                               max_norm=max_norm, exclude=dropped)
            extra = {"method": "quantized"}
        else:  # certified IVF: the exhaustive certificate without an exhaustive scan
            found = certified_ivf_search(ivf, q, k, lipschitz, slack=slack, probe_budget=probe_budget,
                                         exclude=dropped)
            extra = {"method": "certified-ivf", "lists_visited": None if found is None else found.lists_visited}
        if found is None:
            return empty
        ids, cert, complete = found.ids, found.cert, found.bound == -np.inf
        scores, listed = cert.scores, len(found.listed_ids)
        k = len(ids)
        extra.update(exact_topk=found.exact_topk, exhaustive=found.exhaustive, vectors_scanned=found.vectors_scanned)
        if found.budget_hit:
            extra["notes"] = [f"probe budget reached ({found.lists_visited} of {ivf.nlist} lists): the radii are "
                              "sound but may be smaller than the exhaustive certificate's"]
        elif found.capped:
            extra["notes"] = [f"the exactly scored list reached its limit ({listed} items): the radii are sound but "
                              "may be smaller than the exhaustive certificate's"
                              + ("" if found.exact_topk else ", and the top-k is not proved exact")]
    else:
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
        unlisted = 0.0 if complete else 2 * float32_dot_error(len(q), max_norm, float(np.linalg.norm(q)))
        cert = certify_ranked(scores, vectors, k, lipschitz, complete=complete, slack=slack, max_norm=max_norm,
                              unlisted_slack=unlisted, query=q)
        listed = len(ids)
        extra = {"exhaustive": complete or not cert.tail_binds,
                 "exact_topk": complete or bool(scores[k - 1] - scores[-1] - unlisted > ARITHMETIC_SLACK)}
    norm = float(input_norm) if input_norm is not None else 1.0
    cert = cert.scaled(norm)
    paths = gallery.paths(ids[:k])
    hits = []
    for r in range(k):
        radius = float(cert.radius[r])
        hits.append(Hit(r + 1, int(ids[r]), float(scores[r]), paths[r], radius,
                        None if eps is None else bool(radius > eps)))
    values = None  # set by search_images for image queries; here: the encoder input's 3·S·S values
    if radius_space is not None:
        space = radius_space
    elif input_norm is None:
        side = gallery.encoder_info.get("input_size")
        space = f"encoder input {side}×{side}"
        values = 3 * int(side) ** 2 if side else None
    else:
        size = f" ({query_size[1]}×{query_size[0]})" if query_size else ""  # W×H
        space = f"ℓ2 over the query image's 3-channel RGB samples{size} scaled to [0,1]"
    return SearchResult(
        hits, k, n, listed, complete, lipschitz, float(cert.set_radius), float(cert.order_radius), norm, space,
        query_size, eps, None if eps is None else bool(cert.set_radius > eps), int(cert.pairs_evaluated),
        slack=slack, values=values, **extra)


def search_image(gallery, image, k: int = 10, *, certify: bool = True, eps: float | None = None,
                 candidates: int | None = None, exclude=(), probe_budget: int | None = None) -> SearchResult:
    """Embed a query (file path, PIL image or `encoder.image.Pixels`) with the gallery's encoder, search, certify.

    Radii are ℓ2 norms over the file's own samples (each scaled to [0,1] by its bit depth, in the file's
    own channels, EXIF orientation applied; `encoder.image.pixels`), through the encoder's
    `input_norm(size, layout)`: the channel conversion's Lipschitz constant times the exact resize norm.
    A query whose decode is not continuous in its samples gets no radius, with the reason in `notes`.
    """
    return search_images(gallery, [image], k, certify=certify, eps=eps, candidates=candidates,
                         exclude=[exclude], probe_budget=probe_budget)[0]


@dataclass
class PreparedQuery:
    """A query ready for the encoder: what its certificate needs to know of the file's samples
    (`encoder.image.Pixels`: size, layout, why not certifiable, the space radii are over) and the encoder
    input made from them. The decoded image itself is not kept once the input is made."""

    size: tuple[int, int]  # (height, width) of the samples, after EXIF orientation
    layout: str  # the samples' channels (encoder.image.LAYOUT_CHANNELS)
    channels: int  # samples per pixel
    uncertified: str | None  # why no radius can be stated (None: certifiable)
    space: str  # what radii are over, in words (Pixels.describe)
    input: object  # (1, 3, S, S) tensor; from `reduce_query`: a (3, S, S) float32 array, or None (not yet made)
    pixels: object = None  # the samples (encoder.image.Pixels), kept only while `input` is None


def reduce_query(image, input_size: int | None) -> PreparedQuery:
    """A decoded query (PIL image or `Pixels`) → a PreparedQuery, without torch: an image above
    `encoder.resize.BAND_PIXELS` is reduced to the encoder's input now (`encoder.resize.reduce_to_input`,
    the numbers `encoder.preprocess.to_input` gives), so that the caller can drop the decoded image before
    loading the encoder (`robret query`: peak memory is then the larger of the two, not their sum). A
    smaller image (≤ 4 MB as decoded) keeps its samples, and `prepare_query` preprocesses it with the
    encoder. input_size None (unknown before the encoder loads): the samples are kept."""
    from encoder.image import pixels
    from encoder.resize import banded, reduce_to_input

    px = pixels(image)
    reduced = reduce_to_input(px, int(input_size)) if input_size and banded(px.size) else None
    return PreparedQuery(px.size, px.layout, px.channels, px.uncertified, px.describe(), reduced,
                         None if reduced is not None else px)


def prepare_query(gallery, image) -> PreparedQuery:
    """Decode (a path, with the gallery's hardened decoder: DecodeError for a bad file) and preprocess one
    query with the gallery's encoder: the per-query work before embedding, safe to run in threads once
    `gallery.encoder` is loaded. A PreparedQuery from `reduce_query` gets its input finished."""
    from PIL import Image

    from encoder.image import Pixels

    if isinstance(image, (str, os.PathLike)):
        image = gallery.decode(image).image
    elif not isinstance(image, (Image.Image, Pixels, PreparedQuery)):
        raise TypeError(f"expected a file path, a PIL image, Pixels or a PreparedQuery, got {type(image).__name__}")
    query = image if isinstance(image, PreparedQuery) else reduce_query(image, None)
    if query.pixels is not None:
        return replace(query, input=gallery.encoder.preprocess(query.pixels), pixels=None)
    if isinstance(query.input, np.ndarray):
        import torch

        from encoder.protocol import TorchEncoder

        enc = gallery.encoder
        side = getattr(enc, "input_size", None)
        if getattr(type(enc), "preprocess", None) is not TorchEncoder.preprocess or query.input.shape != (3, side, side):
            raise ValueError(f"a query reduced to a {query.input.shape[-1]}-pixel input with the standard "
                             f"preprocessing cannot be embedded by {enc.name} (its own preprocessing or input size)")
        return replace(query, input=torch.from_numpy(query.input)[None])
    return query


def search_images(gallery, images, k: int = 10, *, certify: bool = True, eps: float | None = None,
                  candidates: int | None = None, exclude=None, probe_budget: int | None = None) -> list[SearchResult]:
    """`search_image` for several queries with one encoder call: the same results, faster in bulk.

    images: file paths, PIL images, `Pixels` or `PreparedQuery` (a path is decoded with the gallery's
    hardened decoder: a bad file raises DecodeError, so callers that must go on prepare first, as
    retrieval.bulk does in worker threads). exclude: None, or one collection of ids per image.
    """
    from index.embedder import embed_inputs

    prepared = [prepare_query(gallery, image) for image in images]
    if not prepared:
        return []
    exclude = [()] * len(prepared) if exclude is None else list(exclude)
    if len(exclude) != len(prepared):
        raise ValueError(f"exclude holds {len(exclude)} id lists for {len(prepared)} images")
    enc = gallery.encoder
    embedded = embed_inputs(enc, [p.input for p in prepared])
    # What each certificate needs of its query; the decoded samples are not held while certificates are
    # computed (a large query's image would otherwise stay alive beside the resize-norm computation).
    facts = [(p.size, p.layout, p.uncertified, p.space, p.channels) for p in prepared]
    del prepared, images
    norm_fn = getattr(enc, "input_norm", None)
    results = []
    for (size, layout, uncertified, space, channels), q, dropped in zip(facts, embedded, exclude):
        certifiable = certify and uncertified is None
        input_norm = float(norm_fn(size, layout)) if (norm_fn is not None and certifiable) else None
        result = search_embedding(gallery, q, k, certify=certifiable, eps=eps, input_norm=input_norm,
                                  candidates=candidates, query_size=size,
                                  radius_space=space if input_norm is not None else None, exclude=dropped,
                                  probe_budget=probe_budget)
        if input_norm is not None:
            result.values = channels * size[0] * size[1]
        if certify and uncertified is not None and gallery.lipschitz is not None:
            result.notes = [f"no certificate for this file: {uncertified}"]
        elif certify and result.lipschitz is not None and norm_fn is None:
            result.notes.append("the encoder does not report its resize norm: radii are at the encoder input")
        results.append(result)
    return results
