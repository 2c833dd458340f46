"""How much can certified IVF search skip on real embeddings? Each list bound against the truth (issue 15).

    python -m benchmarks.list_bounds --quick                  # seconds (a test runs it)
    python -m benchmarks.list_bounds --out docs/benchmarks/list-bounds/lipsim-demo

Why: certified IVF (retrieval/ivf_search.py) is only faster than a scan when its bound on a list it has
not visited, U_c ≥ max_{j ∈ c} ⟨q, e_j⟩, falls below what the certificate needs. `certified_search.py`
measures that on synthetic clusters; this script measures it on the bundled encoder's own embeddings, and
separates what the shipped bound loses from what no bound could win (the oracle).

Data: the encoder's (default lipsim:demo) embeddings of random square crops of real photos — the bundled
sample photos, plus the recorded wallpaper photographs with --wallpapers (`make photos`) — each crop's side
10–60% of the photo's shorter side, at a random place, mirrored with probability ½, resized (Lanczos) to
the encoder's input size. Every tenth crop (seeded) is a query, the rest the gallery. Lists: the shipped
`CertifiedIVF.build` (spherical k-means, nearest-centroid assignment, exact ρ_c).

Bounds on max_{j ∈ c} ⟨q, e_j⟩ compared, for every query and list:
- ball (shipped; index/ivf.py `upper_bounds`, float allowances included): ⟨q, μ_c⟩ + ‖q‖·ρ_c;
- ellipsoid, rank m (evaluated here in float64, not shipped): with r_j = e_j − μ_c, V_c the list's top-m
  principal directions of its residuals (orthonormal rows), λ_i their variances floored at σ², σ² the mean
  variance of the other D − m directions, and the positive definite A_c = Vᵀ diag(λ) V + σ²(I − VᵀV),
      ⟨q, r_j⟩ = ⟨A_c^{1/2} q, A_c^{−1/2} r_j⟩ ≤ √(qᵀA_c q) · t_c,   t_c = max_j √(r_jᵀ A_c⁻¹ r_j)
  (Cauchy–Schwarz in the A_c⁻¹ inner product), with qᵀA_c q = Σ λ_i ⟨v_i, q⟩² + σ²(‖q‖² − Σ⟨v_i, q⟩²)
  and r_jᵀA_c⁻¹r_j = Σ ⟨v_i, r_j⟩²/λ_i + (‖r_j‖² − Σ⟨v_i, r_j⟩²)/σ²;
- oracle: the list's true maximum (what scanning it finds; no sound bound can be lower).
For each rank the median share of a list's residual variance that its top-m directions hold is reported
(lists with more than max(ranks) items). Each bound is checked against the oracle on every (query, list): a bound below it is a violation (counted,
must be 0).

When a list may stay unvisited with the certificate still equal to the exhaustive one
(retrieval/ivf_search.py, stopping rule): its bound must be below
  (a) s_k, the k-th score (the top-k is then exact with proof), and
  (b) a B at which the bound on unscored items does not bind: `encoder.certify.unlisted_threshold` (where an
      item scoring at most B can lie; shipped), beside the plain min_i s_i − slack − L·(‖e_i‖ + M)·radius_i
      (shipped before; "plain tail"), radius_i the exhaustive radius.
Reported per bound and list count: the mean fraction of lists, and of gallery vectors, that may stay
unvisited under (a) and under (a) and (b). A per-vector alternative is reported beside them: a projection
onto the gallery's top-d′ principal directions P with each vector's remainder norm stored,
⟨q, e_j⟩ ≤ ⟨Pq, Pe_j⟩ + ‖q − Pq‖·‖e_j − Pe_j‖ (Cauchy–Schwarz on the orthogonal remainder): the fraction
of vectors it rules out under (a)+(b), at the price of a d′-dimensional scan of every vector.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from PIL import Image

from benchmarks._output import write_report
from encoder.certify import certify_ranked, slack_for, unlisted_threshold
from index.ivf import CertifiedIVF

__all__ = ["crop_embeddings", "ellipsoid_bounds", "measure", "main"]


def crop_embeddings(encoder, photos, crops_per_photo: int, seed: int = 0, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D) float32, photo index (n,)) of random crops of `photos` (module doc)."""
    rng = np.random.default_rng(seed)
    size = encoder.input_size
    out, labels = [], []
    pending: list[np.ndarray] = []

    def flush():
        if pending:
            x = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).float().div(255)
            with torch.no_grad():
                out.append(encoder.embed(x.to(encoder.device)).cpu().numpy().astype(np.float32))
            pending.clear()

    for p, photo in enumerate(photos):
        photo = photo.convert("RGB")
        w, h = photo.size
        for _ in range(crops_per_photo):
            side = max(8, int(min(w, h) * rng.uniform(0.1, 0.6)))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            im = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.LANCZOS)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pending.append(np.asarray(im))
            labels.append(p)
            if len(pending) == batch:
                flush()
    flush()
    return np.concatenate(out), np.asarray(labels)


def ellipsoid_bounds(queries: np.ndarray, centroid: np.ndarray, vectors: np.ndarray, rank: int) -> np.ndarray:
    """The rank-m ellipsoid bound (module doc) of one list for every query (Q,), float64."""
    q = np.asarray(queries, np.float64)
    r = np.asarray(vectors, np.float64) - np.asarray(centroid, np.float64)
    dim = r.shape[1]
    m = min(rank, len(r), dim - 1)
    _, sv, vt = np.linalg.svd(r, full_matrices=False)
    v = vt[:m]
    proj = r @ v.T
    rest = np.maximum((r * r).sum(1) - (proj * proj).sum(1), 0.0)
    sigma2 = max(float(rest.sum()) / (len(r) * (dim - m)), 1e-12)
    lam = np.maximum(sv[:m] ** 2 / len(r), sigma2)
    t = np.sqrt(float((((proj * proj) / lam).sum(1) + rest / sigma2).max()))
    qp = q @ v.T
    qaq = (qp * qp * lam).sum(1) + sigma2 * np.maximum((q * q).sum(1) - (qp * qp).sum(1), 0.0)
    return q @ np.asarray(centroid, np.float64) + t * np.sqrt(qaq)


def _needed(query: np.ndarray, scores_sorted: np.ndarray, vecs_sorted: np.ndarray, k: int, lipschitz: float,
            slack: float, max_norm: float) -> tuple[float, float, float]:
    """(s_k, B_needed, B_needed with the plain tail): condition (a)'s and (b)'s thresholds (module doc)."""
    cert = certify_ranked(scores_sorted, vecs_sorted, k, lipschitz, complete=True, slack=slack, max_norm=max_norm)
    norms = np.linalg.norm(vecs_sorted[:k], axis=1)
    big_m = max(max_norm, float(norms.max()))
    plain = float(np.min(cert.scores - slack - lipschitz * (norms + big_m) * cert.radius))
    tight = unlisted_threshold(cert.scores, vecs_sorted[:k], query, cert.radius, big_m, lipschitz, slack)
    return float(scores_sorted[k - 1]), tight, plain


def measure(gallery: np.ndarray, queries: np.ndarray, nlist: int, k: int = 10, ranks=(8, 16, 32),
            dims=(32, 64), lipschitz: float = 1.0, float_error: float = 1e-6, seed: int = 0) -> dict:
    """Fractions of lists / vectors each bound lets certified IVF skip (module doc), for one list count."""
    ivf = CertifiedIVF.build(np.arange(len(gallery)), gallery, nlist, seed=seed)
    g64 = gallery.astype(np.float64)
    q64 = queries.astype(np.float64)
    sizes = np.array([len(ivf.list_vectors(c)[0]) for c in range(ivf.nlist)], dtype=np.float64)
    slack = slack_for(float_error, ivf.max_norm)
    bounds: dict[str, np.ndarray] = {"ball (shipped)": np.stack([ivf.upper_bounds(q) for q in queries])}
    share = {m: [] for m in ranks}  # per list: the share of its residual variance in its top-m directions
    for c in range(ivf.nlist):
        _, vecs = ivf.list_vectors(c)
        if len(vecs) > max(ranks, default=0):
            var = np.linalg.svd(vecs.astype(np.float64) - ivf.centroids[c], compute_uv=False) ** 2
            for m in ranks:
                share[m].append(var[:m].sum() / var.sum())
    for m in ranks:
        b = np.full((len(queries), ivf.nlist), -np.inf)
        for c in range(ivf.nlist):
            ids, vecs = ivf.list_vectors(c)
            if len(ids):
                b[:, c] = ellipsoid_bounds(q64, ivf.centroids[c], vecs, m)
        bounds[f"ellipsoid rank {m}"] = b
    truth = np.full((len(queries), ivf.nlist), -np.inf)
    scores = q64 @ g64.T
    for c in range(ivf.nlist):
        ids, _ = ivf.list_vectors(c)
        if len(ids):
            truth[:, c] = scores[:, ids].max(1)
    bounds["oracle (true list maximum)"] = truth
    need_a, need_b, need_plain = (np.empty(len(queries)) for _ in range(3))
    for i in range(len(queries)):
        order = np.argsort(-scores[i], kind="stable")
        need_a[i], b_needed, plain = _needed(q64[i], scores[i, order], g64[order], k, lipschitz, slack, ivf.max_norm)
        need_b[i], need_plain[i] = min(need_a[i], b_needed), min(need_a[i], plain)
    total = sizes.sum()
    rows = []
    for name, b in bounds.items():
        finite = np.isfinite(truth)
        skip_a = (b < need_a[:, None]) & finite
        skip_b = (b < need_b[:, None]) & finite
        skip_plain = (b < need_plain[:, None]) & finite
        rows.append({"bound": name, "nlist": ivf.nlist, "mean_list_size": round(float(total / finite[0].sum()), 1),
                     "lists_skipped_a": round(float(skip_a.sum(1).mean() / finite[0].sum()), 4),
                     "lists_skipped_ab": round(float(skip_b.sum(1).mean() / finite[0].sum()), 4),
                     "vectors_skipped_a": round(float((skip_a * sizes).sum(1).mean() / total), 4),
                     "vectors_skipped_ab": round(float((skip_b * sizes).sum(1).mean() / total), 4),
                     "vectors_skipped_ab_plain": round(float((skip_plain * sizes).sum(1).mean() / total), 4),
                     "violations": int(((b < truth - 1e-9) & finite).sum())})
        if name.startswith("ellipsoid rank "):
            m = int(name.rsplit(" ", 1)[1])
            rows[-1]["variance_in_rank_median"] = round(float(np.median(share[m])), 4) if share[m] else None
    # Per-vector projection bound (module doc), for the same queries and thresholds.
    _, _, vt = np.linalg.svd(g64, full_matrices=False)
    for d in dims:
        p = vt[:d]
        gp, qp = g64 @ p.T, q64 @ p.T
        g_rest = np.sqrt(np.maximum((g64 * g64).sum(1) - (gp * gp).sum(1), 0.0))
        q_rest = np.sqrt(np.maximum((q64 * q64).sum(1) - (qp * qp).sum(1), 0.0))
        ub = qp @ gp.T + q_rest[:, None] * g_rest[None]
        rows.append({"bound": f"projection d′={d} (per vector)", "nlist": None, "mean_list_size": 1.0,
                     "lists_skipped_a": None, "lists_skipped_ab": None,
                     "vectors_skipped_a": round(float((ub < need_a[:, None]).mean()), 4),
                     "vectors_skipped_ab": round(float((ub < need_b[:, None]).mean()), 4),
                     "vectors_skipped_ab_plain": round(float((ub < need_plain[:, None]).mean()), 4),
                     "violations": int((ub < scores - 1e-9).sum())})
    return {"nlist": ivf.nlist, "rows": rows,
            "s_k_median": round(float(np.median(need_a)), 4), "b_needed_median": round(float(np.median(need_b)), 4),
            "b_needed_plain_median": round(float(np.median(need_plain)), 4)}


def _table(report: dict) -> str:
    lines = [f"{report['encoder']}: {report['gallery']:,} gallery crops of {report['photos']} photos, "
             f"{report['queries']} query crops, top-{report['k']}", "",
             "| bound | lists | mean list size | lists skipped (a) | lists skipped (a)+(b) | vectors skipped (a) | "
             "vectors skipped (a)+(b) | vectors skipped (a)+(b), plain tail | violations |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    for part in report["lists"]:
        for r in part["rows"]:
            if r["nlist"] is None and part is not report["lists"][0]:
                continue  # the per-vector rows do not depend on the lists: shown once
            lines.append(f"| {r['bound']} | {r['nlist'] or '–'} | {r['mean_list_size']} | {pct(r['lists_skipped_a'])} | "
                         f"{pct(r['lists_skipped_ab'])} | {pct(r['vectors_skipped_a'])} | {pct(r['vectors_skipped_ab'])} | "
                         f"{pct(r['vectors_skipped_ab_plain'])} | {r['violations']} |")
    shares = [f"{part['nlist']} lists, rank {r['bound'].rsplit(' ', 1)[1]}: {100 * r['variance_in_rank_median']:.0f}%"
              for part in report["lists"] for r in part["rows"] if r.get("variance_in_rank_median") is not None]
    if shares:
        lines += ["", "Median share of a list's residual variance in its top-m principal directions: " + "; ".join(shares) + "."]
    lines += ["", f"(a): bound < s_k (median s_k {report['lists'][0]['s_k_median']}); (a)+(b): bound also below what the "
              f"radii need (median {report['lists'][0]['b_needed_median']}; with the plain tail bound "
              f"{report['lists'][0]['b_needed_plain_median']}). Violations: a bound below the true maximum."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 photos × 40 crops, 16 lists, the 64 px demo encoder: seconds")
    ap.add_argument("--encoder", default="lipsim:demo", help="encoder spec (default lipsim:demo)")
    ap.add_argument("--crops", type=int, default=300, help="crops per photo (default 300)")
    ap.add_argument("--nlist", type=int, nargs="+", default=[32, 128, 512], help="list counts to compare")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32], help="ellipsoid ranks m")
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64], help="projection dimensions d′")
    ap.add_argument("--wallpapers", action="store_true", help="add the recorded wallpaper photographs (make photos)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmark-results/list_bounds", help="PREFIX: writes PREFIX.json and PREFIX.md")
    args = ap.parse_args(argv)
    from encoder.registry import load_encoder
    from encoder.samples import SAMPLE_PHOTOS, sample_photo

    if args.quick:
        args.encoder, args.crops, args.nlist, args.ranks, args.dims = "lipsim:demo64", 40, [16], [4], [16]
    encoder = load_encoder(args.encoder)
    names = list(SAMPLE_PHOTOS[:6] if args.quick else SAMPLE_PHOTOS)
    photos = [sample_photo(n) for n in names]
    if args.wallpapers:
        from encoder.data.photos import installed_photos, load_reduced

        for split in ("train", "heldout"):
            for rec in installed_photos(split):
                names.append(rec.path)
                photos.append(load_reduced(rec.path, 768))
    t0 = time.perf_counter()
    emb, _ = crop_embeddings(encoder, photos, args.crops, args.seed)
    embed_s = time.perf_counter() - t0
    is_query = np.random.default_rng(args.seed).random(len(emb)) < 0.1
    gallery, queries = emb[~is_query], emb[is_query]
    float_error = encoder.float_error
    parts = [measure(gallery, queries, n, args.k, args.ranks, args.dims, encoder.lipschitz or 1.0, float_error,
                     args.seed) for n in args.nlist]
    report = {"encoder": args.encoder, "photos": len(photos), "crops_per_photo": args.crops, "gallery": int(len(gallery)),
              "queries": int(len(queries)), "k": args.k, "embed_s": round(embed_s, 1), "lists": parts}
    return write_report(args.out, report, _table(report))


if __name__ == "__main__":
    main()
    sys.exit(0)
