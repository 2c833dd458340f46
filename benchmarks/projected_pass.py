"""Would a first pass over fewer dimensions make the certified scan faster on two cores? A projected int8 pass,
then the full int8 codes only where it cannot rule a vector out (issue 15: the 2-core latency targets).

    python -m benchmarks.projected_pass --quick                     # seconds (a test runs it)
    python -m benchmarks.projected_pass --wallpapers --crops 1000 --sizes 1000000 10000000

`benchmarks/code_width.py` showed that fewer bits a coordinate do not help: the int8 scan is bound by its D
multiply-adds a vector, not by memory. Fewer multiply-adds need fewer dimensions, and one sound way to skip
dimensions is a projection. Let V be a D×d′ basis (the top principal directions of a sample of the gallery), y = Vᵀe
coded in int8 as ŷ = a·w (a per-vector scale, as index/codes.py codes e), e⊥ = e − Vŷ, ρ ≥ ‖e⊥‖ per vector and
η ≥ max ‖Vᵀe⊥‖. For a query q with p = Vᵀq (V orthonormal),

    ⟨q, e⟩ = ⟨p, ŷ⟩ + ⟨q − Vp, e⊥⟩ + ⟨p, Vᵀe⊥⟩ ≤ a·⟨p, w⟩ + ‖q − Vp‖·ρ + ‖p‖·η

(split q into Vp and q − Vp, then Cauchy–Schwarz on each part). A first pass computes this bound with d′
multiply-adds a vector; only the vectors whose bound reaches the certificate's threshold need the full int8 bound
(`index.codes`), read at their places ("gathered"). This script measures both halves of that trade, not a shipped
method (nothing here is a certificate; the float32 rounding of the bound is not analysed):

1. Survivors, on real embeddings: lipsim:demo's embeddings of random crops of real photos (as
   `benchmarks.list_bounds` makes them; a fiftieth are queries). For each d′, the share of gallery vectors whose
   bound (float64, with int8 codes) reaches min(s_k, B_needed), the score below which an unscored vector cannot
   change the exhaustive certificate (`benchmarks.list_bounds`, conditions (a) and (b)); the bound is checked
   against every exact score (violations must be 0).
2. Time, on random codes of n vectors (D = 129; timing does not depend on the values): the shipped int8 scan over
   every vector (`index.codes.scan_upper`, two threads) against the projected pass at d′ (the same kernel over d′
   codes) + selecting the vectors whose bound is above a threshold leaving a share f (a pass over the bounds that
   skips 64-row blocks by their maxima) + the full int8 bound of those f·n vectors at their places (two threads),
   f the median and the 90th percentile share measured in 1. Alternating order, medians.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numba import njit

from benchmarks._output import write_report
from benchmarks.certified_search import DIM
from benchmarks.index_speed import _machine

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64


@njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def upper_at(codes, scale, resid, q, nu, rows, out):  # pragma: no cover (compiled)
    """out[j] = scale[r]·Σ_i q_i·codes[r, i] + nu·resid[r] for r = rows[j]: `index._codes_kernel.upper` at chosen
    rows."""
    d = codes.shape[1]
    for j in range(len(rows)):
        r = rows[j]
        acc = np.float32(0.0)
        for i in range(d):
            acc += q[i] * np.float32(codes[r, i])
        out[j] = acc * scale[r] + nu * resid[r]


@njit(nogil=True, cache=True)
def rows_above(bounds, maxima, block, t, out):  # pragma: no cover (compiled)
    """The rows r with bounds[r] > t, in order, into out; skips blocks whose maximum is ≤ t. Returns their count."""
    c = 0
    n = len(bounds)
    for b in range(len(maxima)):
        if maxima[b] > t:
            for r in range(b * block, min(n, (b + 1) * block)):
                if bounds[r] > t:
                    out[c] = r
                    c += 1
    return c


def projected_codes(gallery: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(ŷ (n, d′) float64, codes w (n, d′), ρ (n,), η) of float64 rows for an orthonormal D×d′ basis (module doc)."""
    y = gallery @ basis
    a = np.abs(y).max(1) / 127
    a[a == 0] = 1.0
    w = np.clip(np.rint(y / a[:, None]), -127, 127)
    y_hat = a[:, None] * w
    rest = gallery - y_hat @ basis.T
    return y_hat, w, np.linalg.norm(rest, axis=1), float(np.linalg.norm(rest @ basis, axis=1).max())


def survivors(gallery: np.ndarray, queries: np.ndarray, dims, k: int = 10, lipschitz: float = 1.0,
              float_error: float = 1e-6, seed: int = 0) -> list[dict]:
    """Part 1 of the module doc: per d′, the shares of vectors whose projected bound reaches the threshold."""
    from benchmarks.list_bounds import _needed
    from encoder.certify import slack_for

    g64, q64 = gallery.astype(np.float64), queries.astype(np.float64)
    max_norm = float(np.linalg.norm(g64, axis=1).max())
    slack = slack_for(float_error, max_norm)
    scores = q64 @ g64.T
    need = np.empty(len(q64))
    for i in range(len(q64)):
        order = np.argsort(-scores[i], kind="stable")
        s_k, b_needed, _ = _needed(q64[i], scores[i, order], g64[order], k, lipschitz, slack, max_norm)
        need[i] = min(s_k, b_needed)
    sample = g64[np.random.default_rng(seed).permutation(len(g64))[:20_000]]
    _, var, vt = np.linalg.svd(sample, full_matrices=False)
    var = var ** 2 / (var ** 2).sum()
    rows = []
    for d in dims:
        basis = vt[:d].T
        y_hat, _, rho, eta = projected_codes(g64, basis)
        p = q64 @ basis
        q_rest = np.linalg.norm(q64 - p @ basis.T, axis=1)
        bound = p @ y_hat.T + q_rest[:, None] * rho[None] + np.linalg.norm(p, axis=1)[:, None] * eta
        share = (bound >= need[:, None]).mean(1)
        rows.append({"dims": d, "variance_held": round(float(var[:d].sum()), 4), "eta": round(eta, 5),
                     "rho_median": round(float(np.median(rho)), 4), "query_rest_median": round(float(np.median(q_rest)), 4),
                     "survivors_median": round(float(np.median(share)), 4),
                     "survivors_mean": round(float(share.mean()), 4),
                     "survivors_p90": round(float(np.quantile(share, 0.9)), 4),
                     "violations": int((bound < scores - 1e-9).sum())})
    return rows


def timing(n: int, dims, shares, repeats: int, seed: int = 0) -> dict:
    """Part 2 of the module doc: the int8 scan against the projected pass + selection + gather, in ms (medians)."""
    from index.codes import scan_upper

    rng = np.random.default_rng(seed)
    full = rng.integers(-127, 128, (n, DIM), dtype=np.int8)
    scale = rng.random(n, dtype=np.float32) * np.float32(0.01)
    resid = rng.random(n, dtype=np.float32) * np.float32(0.01)
    q = rng.standard_normal(DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    nu = np.float32(1.0 + 1e-6)
    short = {d: np.ascontiguousarray(full[:, :d]) for d in dims}
    pool = ThreadPoolExecutor(2)
    selected = np.empty(n, np.int64)

    def gather(rows):
        out = np.empty(len(rows), np.float32)
        half = len(rows) // 2
        list(pool.map(lambda cut: upper_at(full, scale, resid, q, nu, rows[cut[0]:cut[1]], out[cut[0]:cut[1]]),
                      [(0, half), (half, len(rows))]))
        return out

    scan_upper([(full[:BLOCK], scale[:BLOCK], resid[:BLOCK])], q, nu)  # numba's cache loaded before timing
    upper_at(full, scale, resid, q, nu, np.arange(2), np.empty(2, np.float32))
    cases = [("int8", None, None)] + [(f"d′={d}, f={f:.3f}", d, f) for d in dims for f in shares[d]]
    thresholds = {}
    for _, d, f in cases[1:]:
        bounds, _ = scan_upper([(short[d], scale, resid)], q[:d].copy(), nu)
        thresholds[(d, f)] = float(np.quantile(bounds, 1 - f)) if f > 0 else np.inf
    times: dict = {name: {"pass": [], "select": [], "gather": [], "total": []} for name, _, _ in cases}
    count = {}
    for r in range(repeats):
        for name, d, f in (cases if r % 2 == 0 else cases[::-1]):
            t0 = time.perf_counter()
            if d is None:
                scan_upper([(full, scale, resid)], q, nu)
                t1 = t2 = t3 = time.perf_counter()
            else:
                bounds, maxima = scan_upper([(short[d], scale, resid)], q[:d].copy(), nu)
                t1 = time.perf_counter()
                c = rows_above(bounds, maxima, BLOCK, np.float32(thresholds[(d, f)]), selected)
                t2 = time.perf_counter()
                gather(selected[:c])
                t3 = time.perf_counter()
                count[name] = c
            for key, v in (("pass", t1 - t0), ("select", t2 - t1), ("gather", t3 - t2), ("total", t3 - t0)):
                times[name][key].append(v)
    pool.shutdown()
    ms = {name: {key: round(1e3 * float(np.median(v)), 3) for key, v in parts.items()} for name, parts in times.items()}
    base = ms["int8"]["total"]
    return {"n": n, "repeats": repeats, "median_ms": ms, "gathered": count,
            "speedup_over_int8": {name: round(base / ms[name]["total"], 3) for name in ms if name != "int8"}}


def table(report: dict) -> str:
    lines = ["Survivors on real embeddings (share of gallery vectors whose projected bound reaches the certificate's "
             f"threshold; {report['gallery']:,} gallery vectors, {report['queries']} queries, top-{report['k']}):", "",
             "| d′ | variance held | η | median ρ | median ‖q − Vp‖ | survivors median / mean / p90 | violations |",
             "|---|---|---|---|---|---|---|"]
    for row in report["survivors"]:
        lines.append(f"| {row['dims']} | {row['variance_held']:.3f} | {row['eta']:.4f} | {row['rho_median']:.3f} | "
                     f"{row['query_rest_median']:.3f} | {100 * row['survivors_median']:.1f}% / "
                     f"{100 * row['survivors_mean']:.1f}% / {100 * row['survivors_p90']:.1f}% | {row['violations']} |")
    lines += ["", "Time on two threads (ms, medians; the projected pass, selecting the survivors, their full int8 bound):",
              "", "| vectors | method | projected pass | select | gather | total | int8 scan / total |",
              "|---|---|---|---|---|---|---|"]
    for row in report["timing"]:
        for name, m in row["median_ms"].items():
            ratio = "1" if name == "int8" else f"{row['speedup_over_int8'][name]:.2f}×"
            label = "int8 scan of every vector (shipped)" if name == "int8" else name
            lines.append(f"| {row['n']:,} | {label} | {m['pass']:.2f} | {m['select']:.2f} | {m['gather']:.2f} | "
                         f"{m['total']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000], help="vectors timed (default 1,000,000)")
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 48, 64], help="projected dimensions d′")
    ap.add_argument("--crops", type=int, default=300, help="crops per photo for the survivors (default 300)")
    ap.add_argument("--wallpapers", action="store_true", help="add the recorded wallpaper photographs (make photos)")
    ap.add_argument("--repeats", type=int, default=15, help="timings of each case (alternating; default 15)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="6 photos × 40 crops, the 64 px encoder, 50,000 vectors: seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projected-pass"))
    args = ap.parse_args(argv)
    from benchmarks.list_bounds import crop_embeddings
    from encoder.registry import load_encoder
    from encoder.samples import SAMPLE_PHOTOS, sample_photo

    encoder_name = "lipsim:demo64" if args.quick else "lipsim:demo"
    if args.quick:
        args.sizes, args.crops, args.repeats, args.dims = [50_000], 40, 3, [16, 32]
    encoder = load_encoder(encoder_name)
    photos = [sample_photo(name) for name in (SAMPLE_PHOTOS[:6] if args.quick else SAMPLE_PHOTOS)]
    if args.wallpapers:
        from encoder.data.photos import installed_photos, load_reduced

        photos += [load_reduced(rec.path, 768) for split in ("train", "heldout") for rec in installed_photos(split)]
    emb, _ = crop_embeddings(encoder, photos, args.crops, seed=1)
    is_query = np.random.default_rng(0).random(len(emb)) < (0.1 if args.quick else 0.02)
    gallery, queries = emb[~is_query], emb[is_query][:200]
    rows = survivors(gallery, queries, args.dims, args.k, encoder.lipschitz or 1.0, encoder.float_error)
    shares = {row["dims"]: (row["survivors_median"], row["survivors_p90"]) for row in rows}
    report = {"machine": _machine(), "encoder": encoder_name, "photos": len(photos), "crops_per_photo": args.crops,
              "gallery": int(len(gallery)), "queries": int(len(queries)), "k": args.k, "survivors": rows,
              "timing": [timing(n, args.dims, shares, args.repeats) for n in args.sizes]}
    return write_report(args.out, report, table(report))


if __name__ == "__main__":
    main()
