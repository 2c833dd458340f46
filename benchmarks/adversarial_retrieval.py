"""Adversarial retrieval benchmark: how far adversarial queries move what a user gets back.

For each encoder (LipSim checkpoints, DreamSim when its weights exist, the standard baseline, the same
CNN with robust metric learning (robdml:demo: an empirical defence, no certificate), raw pixels) on a
retrieval dataset (the offline held-out near-duplicate benchmark, or a labelled folder), overall and, on
the near-duplicate benchmark, per query family (flips, rotations, partial crops, colour / white balance,
low-quality JPEG, perspective, mild edits; retrieval/bench_data.py):

- clean Recall@1/5/10 and mAP;
- certified Recall@1 at each ℓ2 ε (a query counts when its correct top-1 is certified at ε), for
  encoders with a Lipschitz bound (stated in the benchmark's image space: L·‖resize‖₂);
- empirical Recall@1 under ℓ2 and ℓ∞ attacks at each ε: a margin PGD attack on the top-1 and
  AutoAttack on nearest-neighbour retrieval (retrieval/attacks/); a query counts only when clean-
  correct and no attack moves its top-1. A certified query broken by an attack is a violation
  (expected: never);
- overlap@5 under the untargeted top-k attack (what the UI shows, through the same
  retrieval.attacks.attack_query), with any top-k certificate it broke (expected: never);
- robrank's suite (ℓ∞ 8/255, 32 steps) and its ERS.

Writes results.json, results.md and plots (Recall@1 vs ε: empirical solid, certified dashed).

    python -m benchmarks.adversarial_retrieval                      # the full run (CPU: about an hour)
    python -m benchmarks.adversarial_retrieval --quick              # seconds (CI)
    python -m benchmarks.adversarial_retrieval --dataset photos     # every held-out photo (after `make photos`)
    python -m benchmarks.adversarial_retrieval --dataset ~/CUB --encoders lipsim:demo pixels
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger("benchmarks.adversarial_retrieval")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "adversarial"
FULL_L2 = (36 / 255, 0.25, 0.5, 1.0, 2.0, 3.0)
FULL_LINF = (2 / 255, 8 / 255)
CERT_L2 = (0.05, 0.1, 36 / 255, 0.2, 0.25, 72 / 255, 0.4, 0.5, 108 / 255, 0.75, 1.0)
TARGETS = {"clean_recall@1": 95.0, "certified_recall@1@36/255": 80.0, "l2_recall@1@0.5": 85.0, "baseline_factor": 3.0}


def _fmt_eps(e: float) -> str:
    """0.1412 → "36/255" (robrank's and LipSim's ε are multiples of 1/255), 0.5 → "0.5"."""
    n = e * 255
    if 1 <= n < 255 and abs(n - round(n)) < 1e-6:
        return f"{int(round(n))}/255"
    return f"{e:g}"


def default_encoders() -> list[str]:
    from encoder import list_encoders

    specs = ["lipsim:demo", "standard:demo", "pixels"]
    if "robdml:demo" in list_encoders():  # the empirical defence (HM[S, g_LGA] + ICS), beside the certified one
        specs.insert(2, "robdml:demo")
    if "dreamsim:ensemble" in list_encoders():  # the paper's DreamSim; name other variants explicitly
        specs.append("dreamsim:ensemble")
    return specs


def _load(spec: str, device: str):
    """(encoder, None) or (None, why it was skipped)."""
    from encoder import load_encoder

    try:
        enc = load_encoder(spec, device=device)
    except Exception as exc:  # weights absent, backend not installed, … — say so and go on
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if not enc.pretrained:
        log.warning("%s has random weights: its numbers show the machinery, not a trained model", spec)
    return enc, None


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _robust_recall(emb, gallery, ds, correct, norm: str, eps: float, args, bar) -> tuple[dict, torch.Tensor]:
    """Recall@1 at (norm, eps) under the margin attack, then AutoAttack on the queries it left
    correct (worst case over attacks). Returns (summary, per-query robust hits)."""
    from retrieval.attacks import PGDConfig, autoattack_untargeted, misrank_top1

    q = ds.queries.shape[0]
    hit = correct.clone()
    cfg = PGDConfig(norm=norm, eps=eps, steps=args.steps, step=2.5 * eps / args.steps)
    for sl in _batches(q, args.batch_size):
        idx = torch.arange(sl.start, sl.stop)[correct[sl].bool()]
        if idx.numel():
            _, h = misrank_top1(emb, ds.queries[idx], gallery, ds.query_labels[idx], ds.gallery_labels,
                                self_index=ds.query_self_index[idx], config=cfg)
            hit[idx] = h.cpu()
        bar.update(sl.stop - sl.start)
    summary = {"margin": 100.0 * float(hit.mean())}
    aa_grid = args.aa_l2_eps if norm == "l2" else args.aa_linf_eps
    if args.autoattack and any(abs(eps - e) < 1e-9 for e in aa_grid):
        survivors = torch.nonzero(hit.bool()).view(-1)
        broken = 0
        for sl in _batches(survivors.numel(), args.batch_size):
            idx = survivors[sl]
            _, h = autoattack_untargeted(
                emb, ds.queries[idx], gallery, ds.query_labels[idx], ds.gallery_labels,
                norm=norm, eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"],
                n_target_classes=args.aa_targets, n_iter=args.aa_iter, seed=args.seed, batch_size=args.batch_size)
            hit[idx] = h.cpu()
            broken += int((h == 0).sum())
        summary["autoattack_extra_broken"] = broken
    summary["recall@1"] = 100.0 * float(hit.mean())
    return summary, hit.bool()


def _clean_and_certified(emb, gallery, ds, l2_eps) -> tuple[dict, torch.Tensor, np.ndarray | None]:
    """Clean Recall@k/mAP and certified Recall@1 on `ds`; also per-query correctness and radii."""
    from retrieval.metrics import certified_radii, mean_average_precision, recall_at_k

    qe = emb.embed(ds.queries)
    sim = (qe @ gallery.T).cpu()
    rec = recall_at_k(sim, ds.query_labels, ds.gallery_labels, (1, 5, 10), ds.query_self_index)
    out: dict = {"queries": int(ds.queries.shape[0]), "clean": {f"recall@{k}": v for k, v in rec.items()}}
    out["clean"]["mAP"] = mean_average_precision(sim, ds.query_labels, ds.gallery_labels, ds.query_self_index)
    rows = (ds.query_self_index >= 0).nonzero().view(-1)
    sim[rows, ds.query_self_index[rows]] = -math.inf
    correct = (ds.gallery_labels[sim.argmax(1)] == ds.query_labels).float()
    radii = None
    lip = emb.image_lipschitz((ds.size, ds.size))
    if lip is not None:
        radii = certified_radii(qe.cpu(), gallery.cpu(), ds.query_labels, ds.gallery_labels, lip, 1,
                                ds.query_self_index)
        eps_grid = sorted(set(CERT_L2) | set(l2_eps))
        out["certified_l2"] = {_fmt_eps(e): 100.0 * float((radii > e).mean()) for e in eps_grid}
        out["certified_radius_median"] = float(np.median(radii))
    if "query_edits" in ds.info:
        fam = ds.info.get("query_family")
        rows = [i for i in range(len(ds.info["query_edits"])) if fam is None or fam[i] == "edits"]
        if rows:
            out["by_edit"] = _by_edit([ds.info["query_edits"][i] for i in rows], correct[rows],
                                      None if radii is None else radii[rows])
    if "query_family" in ds.info:
        out["by_family"] = _by_family(ds.info["query_family"], correct, radii)
    out["geometry"] = _geometry(qe.cpu(), gallery.cpu(), ds, lip)
    return out, correct, radii


def _geometry(qe, gallery, ds, lip) -> dict:
    """What the top-1 certificate is made of. For the query's best correct item m and a wrong item j,
    with u = (e_m − e_j)/‖e_m − e_j‖ (unit vectors, so the bisector passes through the origin):

        L·r_j = ⟨e(q), u⟩ = ‖e_m − e_j‖/2 − ⟨e_m − e(q), u⟩     (half gap − drift towards j)

    and the certificate is min_j r_j. Reported: medians over queries, at the binding j, of the half
    gap and the drift, and of the drift ‖e_m − e(q)‖ itself: crowded galleries (small gaps) and edits
    the encoder is not invariant to (large drift) are the two limits."""
    same = ds.gallery_labels[None, :] == ds.query_labels[:, None]
    rows = (ds.query_self_index >= 0).nonzero().view(-1)
    wrong = ~same
    wrong[rows, ds.query_self_index[rows]] = False
    same[rows, ds.query_self_index[rows]] = False
    ok = same.any(1) & wrong.any(1)
    m = gallery[(qe @ gallery.T).masked_fill(~same, -math.inf).argmax(1)]  # (Q, D)
    # ‖e_m − e_j‖² = 2 − 2⟨e_m, e_j⟩ and ⟨e(q), e_m − e_j⟩ for unit vectors, without a (Q, N, D) tensor
    norm = (2 - 2 * (m @ gallery.T)).clamp_min(1e-24).sqrt()
    r = ((qe * m).sum(1, keepdim=True) - qe @ gallery.T) / norm  # L·r_j, (Q, N)
    r = r.masked_fill(~wrong, math.inf)
    j = r.argmin(1)
    idx = torch.arange(qe.shape[0])
    half_gap = norm[idx, j] / 2
    drift_to_j = half_gap - r[idx, j]
    out = {"half_gap_median": float(half_gap[ok].median()), "drift_towards_binding_median":
           float(drift_to_j[ok].median()), "drift_norm_median": float((m - qe).norm(dim=1)[ok].median()),
           "L_times_radius_median": float(r[idx, j][ok].median())}
    if lip is not None:
        # a query identical to m (no drift) is certified up to min_j ‖e_m − e_j‖/(2L): the crowding ceiling
        zero_drift = norm.masked_fill(~wrong, math.inf).amin(1)[ok] / (2 * lip)
        out["L"] = lip
        out["zero_drift_certified@36/255"] = 100.0 * float((zero_drift > 36 / 255).float().mean())
        out["zero_drift_radius_q20"] = float(zero_drift.quantile(0.2))
    return out


def _by_edit(edits: list[list[str]], correct: torch.Tensor, radii: np.ndarray | None) -> dict:
    """Clean and certified (36/255) Recall@1 of the queries that received each kind of edit."""
    from retrieval.bench_data import EDITS

    out = {}
    for kind in EDITS:
        rows = [i for i, log in enumerate(edits) if any(e.startswith(kind) for e in log)]
        if not rows:
            continue
        entry = {"queries": len(rows), "clean_recall@1": 100.0 * float(correct[rows].mean())}
        if radii is not None:
            entry["certified_recall@1@36/255"] = 100.0 * float((radii[rows] > 36 / 255).mean())
            entry["radius_median"] = float(np.median(radii[rows]))
        out[kind] = entry
    return out


FAMILY_CERT_L2 = (36 / 255, 72 / 255, 0.25, 0.5)  # the certified radii reported per family


def _by_family(families: list[str], correct: torch.Tensor, radii: np.ndarray | None, robust=None) -> dict:
    """Per query family (retrieval.bench_data.FAMILIES): clean Recall@1, certified Recall@1 at
    FAMILY_CERT_L2, and, given `robust` {(norm, eps key): per-query robust hits}, Recall@1 under attack."""
    out = {}
    for fam in dict.fromkeys(families):
        rows = [i for i, f in enumerate(families) if f == fam]
        entry = {"queries": len(rows), "clean_recall@1": 100.0 * float(correct[rows].mean())}
        if radii is not None:
            entry["certified_l2"] = {_fmt_eps(e): 100.0 * float((radii[rows] > e).mean()) for e in FAMILY_CERT_L2}
        if robust:
            entry["empirical"] = {norm: {key: 100.0 * float(hit[rows].float().mean()) for (n, key), hit in robust.items()
                                         if n == norm} for norm in ("l2", "linf")}
        out[fam] = entry
    return out


def evaluate_encoder(spec: str, enc, ds, args, full=None) -> dict:
    """Every measurement of one encoder on `ds` (and clean/certified numbers on `full` as well)."""
    from retrieval.attacks import ROBRANK_LINF, ImageEmbedder, robrank_suite

    t0 = time.time()
    emb = ImageEmbedder(enc, batch_size=args.batch_size)
    gallery = emb.embed(ds.gallery)
    lip = emb.image_lipschitz((ds.size, ds.size))
    out: dict = {"status": "ok", "name": emb.name, "input_size": emb.input_size, "dim": int(gallery.shape[1]),
                 "lipschitz_image": lip}
    summary, correct, radii = _clean_and_certified(emb, gallery, ds, args.l2_eps)
    out.update(summary)
    if full is not None and full.queries.shape[0] != ds.queries.shape[0]:
        out["all_queries"] = _clean_and_certified(emb, gallery, full, args.l2_eps)[0]

    out["empirical"] = {"l2": {}, "linf": {}}
    violations = 0
    robust_hits = {}
    total_units = len(args.l2_eps) * ds.queries.shape[0] + len(args.linf_eps) * ds.queries.shape[0]
    with tqdm(total=total_units, desc=f"{spec}: attacks", leave=False, disable=args.no_progress) as bar:
        for norm, grid in (("l2", args.l2_eps), ("linf", args.linf_eps)):
            for eps in grid:
                r, robust = _robust_recall(emb, gallery, ds, correct, norm, eps, args, bar)
                robust_hits[(norm, _fmt_eps(eps))] = robust
                if radii is not None:
                    # ℓ2 ball of radius eps; an ℓ∞ ball of radius eps reaches ℓ2 norm eps·√n
                    reach = eps if norm == "l2" else eps * math.sqrt(ds.queries[0].numel())
                    certified = torch.from_numpy(radii > reach) & correct.bool()
                    v = int((certified & ~robust).sum())
                    r["certified_broken"] = v
                    violations += v
                out["empirical"][norm][_fmt_eps(eps)] = r
    out["certificate_violations"] = violations
    if "query_family" in ds.info:
        out["by_family"] = _by_family(ds.info["query_family"], correct, radii, robust_hits)

    if args.topk_queries:
        out["topk"] = _topk_attacks(emb, gallery, ds.subset(args.topk_queries), args)

    if args.ers_queries:
        sub = ds.subset(args.ers_queries)
        n = sub.queries.shape[0]
        cfg = ROBRANK_LINF if not args.quick else ROBRANK_LINF.replace(steps=args.steps)
        with tqdm(total=9 * n, desc=f"{spec}: robrank suite", leave=False, disable=args.no_progress) as bar:
            last = {}

            def progress(name, done, total):
                bar.update(done - last.get(name, 0))
                last[name] = done

            suite = robrank_suite(emb, sub.queries, sub.query_labels, ds.gallery, ds.gallery_labels,
                                  query_self_index=sub.query_self_index, config=cfg, seed=args.seed,
                                  batch_size=args.batch_size, progress=progress)
        out["robrank"] = suite.to_dict()
        out["robrank"]["queries"] = n
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _topk_attacks(emb, gallery, sub, args) -> dict:
    """The UI's untargeted top-5 attack on each query (retrieval.attacks.attack_query over the embedded
    gallery): overlap@5 after it, and how often it broke what the clean query's certificate promised
    (expected: never)."""
    from retrieval.attacks import PGDConfig, VectorGallery, attack_query

    g = VectorGallery(gallery.cpu().numpy(), emb.lipschitz, emb.input_size,
                      float_error=getattr(emb.encoder, "float_error", None) if emb.lipschitz is not None else None)
    cfg = PGDConfig(norm="l2", eps=args.topk_eps, steps=args.steps)
    outcomes = [attack_query(g, sub.queries[i], kind="untargeted", config=cfg, k=5, embedder=emb)
                for i in range(sub.queries.shape[0])]
    ov = torch.tensor([o.overlap for o in outcomes])
    checks = [o.certificate for o in outcomes if o.certificate is not None]
    return {"k": 5, "eps_l2": args.topk_eps, "queries": len(outcomes), "overlap_before": 100.0,
            "overlap_after": 100.0 * float(ov.mean()), "fully_replaced": 100.0 * float((ov == 0).float().mean()),
            "certified_queries": len(checks), "certificate_violations": sum(not c.ok for c in checks)}


def _targets(results: dict, l2_key: str = "0.5") -> dict | None:
    """The issue's targets for the LipSim demo model, checked against the baseline."""
    lip = results.get("lipsim:demo")
    if not lip or lip.get("status") != "ok":
        return None
    base = results.get("standard:demo", {})
    emp = lip["empirical"]["l2"].get(l2_key, {})
    base_emp = base.get("empirical", {}).get("l2", {}).get(l2_key, {}) if base.get("status") == "ok" else {}
    checks = {
        "clean_recall@1": (lip["clean"]["recall@1"], TARGETS["clean_recall@1"]),
        "certified_recall@1@36/255": (lip.get("certified_l2", {}).get("36/255"), TARGETS["certified_recall@1@36/255"]),
        "l2_recall@1@0.5": (emp.get("recall@1"), TARGETS["l2_recall@1@0.5"]),
    }
    out = {k: {"value": v, "target": t, "met": v is not None and v >= t} for k, (v, t) in checks.items()}
    if base.get("status") == "ok":
        ratios = {}
        for norm in ("l2", "linf"):
            for key, r in lip["empirical"][norm].items():
                b = base["empirical"][norm].get(key, {}).get("recall@1")
                if b is not None:
                    ratios[f"{norm} {key}"] = (r["recall@1"] / b) if b else math.inf
        b = base_emp.get("recall@1")
        ratio = ratios.get(f"l2 {l2_key}")
        out["vs_baseline@0.5"] = {"value": ratio, "baseline": b, "target": TARGETS["baseline_factor"],
                                  "met": ratio is not None and ratio >= TARGETS["baseline_factor"],
                                  "ratio_by_eps": ratios}
        # issue 17: at least 3× the comparison encoder's Recall@1 under ℓ2 attacks at 2 and 3
        for key in ("2", "3"):
            b = base["empirical"]["l2"].get(key, {}).get("recall@1")
            v = lip["empirical"]["l2"].get(key, {}).get("recall@1")
            if b is not None and v is not None:
                ratio = v / b if b else math.inf
                out[f"l2_recall@1@{key} / standard:demo"] = {"value": ratio, "target": TARGETS["baseline_factor"],
                                                             "met": ratio >= TARGETS["baseline_factor"]}
    pix = results.get("pixels", {})
    if pix.get("status") == "ok":  # issue 17: never below raw pixels
        for key in ("0.5", "1", "2", "3"):
            b = pix["empirical"]["l2"].get(key, {}).get("recall@1")
            v = lip["empirical"]["l2"].get(key, {}).get("recall@1")
            if b is not None and v is not None:
                out[f"l2_recall@1@{key} ≥ pixels"] = {"value": v, "target": b, "met": v >= b}
        def families(r):  # clean per family on every query when the run had more than it attacked
            return r.get("all_queries", {}).get("by_family") or r.get("by_family", {})

        for fam, entry in families(lip).items():
            b = families(pix).get(fam, {}).get("clean_recall@1")
            if b is not None:
                v = entry["clean_recall@1"]
                out[f"clean_recall@1 ≥ pixels on {fam}"] = {"value": v, "target": b, "met": v >= b}
    return out


def write_markdown(report: dict, path: Path) -> str:
    res = report["encoders"]
    l2 = [_fmt_eps(e) for e in report["config"]["l2_eps"]]
    linf = [_fmt_eps(e) for e in report["config"]["linf_eps"]]
    lines = [f"# Adversarial retrieval — {report['dataset']['name']} "
             f"({report['dataset']['queries']} queries, gallery {report['dataset']['gallery']}, "
             f"{report['dataset']['image_size']}×{report['dataset']['image_size']} px)", "",
             *(["Commands (merged): " + "; ".join(f"`{c}`" for c in report["merged_commands"])]
               if report.get("merged_commands") else [f"Command: `{report['command']}`"]), "",
             "Recall@1 in %. ε is measured on the benchmark's images ([0,1] pixels); empirical = correct and "
             "unmoved by every attack: margin PGD (" + f"{report['config']['steps']} steps)"
             + (" + AutoAttack APGD-CE/APGD-T at ℓ2 " + ", ".join(_fmt_eps(e) for e in report['config']['aa_l2_eps'])
                + " and ℓ∞ " + ", ".join(_fmt_eps(e) for e in report['config']['aa_linf_eps'])
                if report['config']['autoattack'] else "")
             + "; certified = correct top-1 certified at ε. ERS: robrank's suite, ℓ∞ 8/255, "
             + f"{report['config']['steps'] if report['config']['quick'] else 32} steps.", ""]
    head = ["encoder", "L (image)", "clean R@1", "mAP"]
    cert = [_fmt_eps(e) for e in FAMILY_CERT_L2]  # the radii issue 17 reports (always in CERT_L2's grid)
    head += [f"cert ℓ2 {e}" for e in cert] + [f"ℓ2 {e}" for e in l2] + [f"ℓ∞ {e}" for e in linf]
    head += ["overlap@5 ℓ2", "ERS", "violations"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, r in res.items():
        if r.get("status") != "ok":
            lines.append(f"| {spec} | skipped (below) |" + " |" * (len(head) - 2))
            continue
        row = [spec, "—" if r["lipschitz_image"] is None else f"{r['lipschitz_image']:.3f}",
               f"{r['clean']['recall@1']:.1f}", f"{r['clean']['mAP']:.1f}"]
        row += [f"{r['certified_l2'][e]:.1f}" if "certified_l2" in r else "—" for e in cert]
        row += [f"{r['empirical']['l2'][e]['recall@1']:.1f}" for e in l2]
        row += [f"{r['empirical']['linf'][e]['recall@1']:.1f}" for e in linf]
        row.append(f"{r['topk']['overlap_after']:.1f}" if "topk" in r else "—")
        row.append(f"{r['robrank']['ers']:.1f}" if "robrank" in r else "—")
        row.append(str(r.get("certificate_violations", "—")) if r["lipschitz_image"] is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    full_rows = [(s, r["all_queries"]) for s, r in res.items() if r.get("status") == "ok" and "all_queries" in r]
    if full_rows:
        lines += ["", f"On all {full_rows[0][1]['queries']} queries (no attack): "
                  + "; ".join(f"{s}: clean R@1 {a['clean']['recall@1']:.1f}"
                              + (f", certified R@1 at 36/255 {a['certified_l2']['36/255']:.1f}" if "certified_l2" in a else "")
                              for s, a in full_rows)]
    ers_rows = [(s, r["robrank"]) for s, r in res.items() if r.get("status") == "ok" and "robrank" in r]
    if ers_rows:
        from retrieval.metrics import ERS_KEYS

        lines += ["", "robrank suite (after attack; CA±/QA± prank %, TMA cosine, ES:D shift, "
                  "ES:R/LTM/GTM R@1 %, GTT retain@4 %):", "",
                  "| encoder | queries | " + " | ".join(ERS_KEYS) + " | ERS |", "|" + "---|" * (len(ERS_KEYS) + 3)]
        for s, rr in ers_rows:
            vals = [f"{rr['scores'][k]:.3f}" if k in ("TMA", "ES:D") else f"{rr['scores'][k]:.1f}" for k in ERS_KEYS]
            lines.append(f"| {s} | {rr['queries']} | " + " | ".join(vals) + f" | {rr['ers']:.1f} |")
    geo = [(s, r) for s, r in res.items() if r.get("status") == "ok" and r.get("lipschitz_image") is not None]
    if geo:
        lines += ["", "Certificate anatomy (medians; L·r = half gap − drift towards the binding impostor, "
                  "see `_geometry`; zero drift: the query's own gallery item as the query):", "",
                  "| encoder | L·r | half gap | drift towards it | ‖drift‖ | zero-drift cert 36/255 |",
                  "|---|---|---|---|---|---|"]
        for s, r in geo:
            g = r["geometry"]
            lines.append(f"| {s} | {g['L_times_radius_median']:.4f} | {g['half_gap_median']:.4f} | "
                         f"{g['drift_towards_binding_median']:.4f} | {g['drift_norm_median']:.4f} | "
                         f"{g['zero_drift_certified@36/255']:.1f} |")
    edits = [(s, r["by_edit"]) for s, r in res.items() if r.get("status") == "ok" and "by_edit" in r]
    if edits:
        kinds = list(edits[0][1])
        lines += ["", "Clean / certified (36/255) Recall@1 by edit received:", "",
                  "| encoder | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
        for s, be in edits:
            cells = [f"{be[k]['clean_recall@1']:.0f}" + (f" / {be[k]['certified_recall@1@36/255']:.0f}"
                     if "certified_recall@1@36/255" in be[k] else "") for k in kinds]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    fams = [(s_, r["by_family"]) for s_, r in res.items() if r.get("status") == "ok" and "by_family" in r]
    if fams:
        l2_keys = [_fmt_eps(e) for e in report["config"]["l2_eps"]]
        linf_keys = [_fmt_eps(e) for e in report["config"]["linf_eps"]]
        cert_keys = [_fmt_eps(e) for e in FAMILY_CERT_L2]
        attacked = [f"ℓ2 {k}" for k in l2_keys] + [f"ℓ∞ {k}" for k in linf_keys]
        lines += ["", "By query family (Recall@1 %: clean; certified at ℓ2 " + ", ".join(cert_keys)
                  + ("; under attack at " + ", ".join(attacked) if attacked else "") + "):", "",
                  "| " + " | ".join(["family", "encoder", "queries", "clean", *(f"cert {k}" for k in cert_keys),
                                     *attacked]) + " |",
                  "|" + "---|" * (4 + len(cert_keys) + len(attacked))]
        for fam in fams[0][1]:
            for s_, bf in fams:
                e = bf.get(fam)
                if e is None:
                    continue
                cells = [fam, s_, str(e["queries"]), f"{e['clean_recall@1']:.1f}"]
                cells += [f"{e['certified_l2'][k]:.1f}" if "certified_l2" in e else "—" for k in cert_keys]
                emp = e.get("empirical", {})
                cells += [f"{emp['l2'][k]:.1f}" if k in emp.get("l2", {}) else "—" for k in l2_keys]
                cells += [f"{emp['linf'][k]:.1f}" if k in emp.get("linf", {}) else "—" for k in linf_keys]
                lines.append("| " + " | ".join(cells) + " |")
    every = [(s_, r["all_queries"]["by_family"]) for s_, r in res.items()
             if r.get("status") == "ok" and "by_family" in r.get("all_queries", {})]
    if every:
        cert_keys = [_fmt_eps(e) for e in FAMILY_CERT_L2]
        heads = [f"{s_} clean" + ("".join(f" / cert {k}" for k in cert_keys)
                                  if "certified_l2" in next(iter(bf.values())) else "") for s_, bf in every]
        lines += ["", f"By query family on all {sum(e['queries'] for e in every[0][1].values())} queries, no attack "
                  "(clean and certified Recall@1 %):", "",
                  "| family | queries | " + " | ".join(heads) + " |", "|" + "---|" * (2 + len(every))]
        for fam in every[0][1]:
            cells = [fam, str(every[0][1][fam]["queries"])]
            for _s, bf in every:
                e = bf[fam]
                cells.append(f"{e['clean_recall@1']:.1f}" + ("".join(f" / {e['certified_l2'][k]:.1f}" for k in cert_keys)
                                                             if "certified_l2" in e else ""))
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("targets"):
        lines += ["", "Targets for lipsim:demo:", ""]
        for k, v in report["targets"].items():
            val = v["value"]
            val = "—" if val is None else f"{val:.2f}"
            target = v["target"] if isinstance(v["target"], int) else f"{v['target']:.2f}"
            lines.append(f"- {k}: {val} (target {target}) — {'met' if v['met'] else 'NOT met'}")
            if "ratio_by_eps" in v:
                lines.append("  - Recall@1 ratio lipsim:demo / standard:demo by radius: " + ", ".join(
                    f"{e}: {r:.2f}" for e, r in v["ratio_by_eps"].items()))
    skipped = [(s, r["note"]) for s, r in res.items() if r.get("status") != "ok"]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s}: {n}" for s, n in skipped]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for norm, grid_key in (("l2", "l2_eps"), ("linf", "linf_eps")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (spec, r) in enumerate(report["encoders"].items()):
            if r.get("status") != "ok":
                continue
            colour = f"C{i}"
            xs = [0.0] + list(report["config"][grid_key])
            ys = [r["clean"]["recall@1"]] + [r["empirical"][norm][_fmt_eps(e)]["recall@1"] for e in report["config"][grid_key]]
            ax.plot(xs, ys, "-o", color=colour, label=f"{spec} empirical")
            if norm == "l2" and "certified_l2" in r:
                ce = sorted(set(CERT_L2) | set(report["config"]["l2_eps"]))
                ax.plot([0.0] + ce, [r["clean"]["recall@1"]] + [r["certified_l2"][_fmt_eps(e)] for e in ce], "--",
                        color=colour, label=f"{spec} certified")
        ax.set_xlabel(f"ε ({'ℓ2' if norm == 'l2' else 'ℓ∞'}, [0,1] pixels of {report['dataset']['image_size']}² images)")
        ax.set_ylabel("Recall@1 (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Recall@1 under {'ℓ2' if norm == 'l2' else 'ℓ∞'} attacks — {report['dataset']['name']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"recall_vs_eps_{norm}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adversarial_retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", nargs="+", default=None, help="encoder specs (default: lipsim:demo standard:demo "
                   "robdml:demo pixels dreamsim:ensemble; --quick: lipsim:demo or lipsim:cpu-tiny, and pixels)")
    p.add_argument("--dataset", default="heldout", help="'heldout' (offline near-duplicate benchmark on the sample "
                   "photos), 'photos' (on every held-out photo; `make photos` first) or a labelled folder")
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="query families of the near-duplicate benchmark (default: all of "
                        "retrieval.bench_data.FAMILIES; 'edits' alone is the benchmark as first published)")
    p.add_argument("--size", type=int, default=None, help="benchmark image side in px (default 64; --quick 32)")
    p.add_argument("--queries", type=int, default=None,
                   help="evaluate this many evenly spaced queries (default 96; --quick: all; 0: all)")
    p.add_argument("--l2-eps", type=float, nargs="*", default=None, help=f"ℓ2 radii (default {FULL_L2})")
    p.add_argument("--linf-eps", type=float, nargs="*", default=None, help="ℓ∞ radii (default 2/255 8/255)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps of the margin and top-k attacks (default 30)")
    p.add_argument("--no-autoattack", dest="autoattack", action="store_false", help="margin PGD only")
    p.add_argument("--aa-iter", type=int, default=None, help="APGD iterations (default 25)")
    p.add_argument("--aa-l2-eps", type=float, nargs="*", default=None,
                   help="ℓ2 radii where AutoAttack also runs (default 0.5; --quick: all)")
    p.add_argument("--aa-linf-eps", type=float, nargs="*", default=None,
                   help="ℓ∞ radii where AutoAttack also runs (default 8/255; --quick: all)")
    p.add_argument("--aa-targets", type=int, default=None, help="APGD-T target classes (default 2)")
    p.add_argument("--ers-queries", type=int, default=None, help="queries for the robrank suite (0: skip; default 32)")
    p.add_argument("--topk-queries", type=int, default=None, help="queries for the top-k attack (0: skip; default 32)")
    p.add_argument("--topk-eps", type=float, default=0.5, help="ℓ2 radius of the top-k attack")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--merge", action="store_true",
                   help="keep the other encoders' results already in OUT/results.json (same dataset)")
    p.add_argument("--quick", action="store_true", help="tiny everything (CI): seconds, numbers meaningless")
    p.add_argument("--no-progress", action="store_true")
    return p


def _apply_defaults(args) -> None:
    q = args.quick
    from encoder.registry import bundled_weights

    if args.encoders is None:
        if q:
            args.encoders = ["lipsim:demo" if "demo" in bundled_weights("lipsim") else "lipsim:cpu-tiny", "pixels"]
        else:
            args.encoders = default_encoders()
    args.size = args.size or (32 if q else 64)
    args.l2_eps = tuple(args.l2_eps) if args.l2_eps is not None else ((0.5,) if q else FULL_L2)
    args.linf_eps = tuple(args.linf_eps) if args.linf_eps is not None else ((8 / 255,) if q else FULL_LINF)
    args.steps = args.steps or (3 if q else 30)
    args.aa_iter = args.aa_iter or (2 if q else 25)
    args.aa_targets = args.aa_targets or (1 if q else 2)
    args.aa_l2_eps = tuple(args.aa_l2_eps) if args.aa_l2_eps is not None else (args.l2_eps if q else (0.5,))
    args.aa_linf_eps = tuple(args.aa_linf_eps) if args.aa_linf_eps is not None else (args.linf_eps if q else (8 / 255,))
    args.queries = args.queries if args.queries is not None else (0 if q else 96)
    args.ers_queries = args.ers_queries if args.ers_queries is not None else (4 if q else 32)
    args.topk_queries = args.topk_queries if args.topk_queries is not None else (4 if q else 32)


def run(argv: list[str] | None = None) -> dict:
    from retrieval.bench_data import load_benchmark

    args = build_parser().parse_args(argv)
    _apply_defaults(args)
    torch.manual_seed(args.seed)
    from retrieval.bench_data import FAMILIES

    full = load_benchmark(args.dataset, size=args.size, quick=args.quick, seed=args.seed,
                          families=tuple(args.families or FAMILIES))
    ds = full.subset(args.queries) if args.queries else full
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.adversarial_retrieval " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command.strip(),
        "dataset": ds.summary(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in ("out",)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                        "threads": torch.get_num_threads()},
        "encoders": {},
    }
    path = args.out / "results.json"
    if args.merge and path.exists():
        previous = json.loads(path.read_text())
        if previous["dataset"]["fingerprint"] != report["dataset"]["fingerprint"]:
            raise ValueError(f"{path} holds results on another dataset: not merging")
        report["encoders"] = {k: v for k, v in previous["encoders"].items() if k not in args.encoders}
        report["merged_commands"] = previous.get("merged_commands", [previous["command"]]) + [report["command"]]
    for spec in tqdm(args.encoders, desc="encoders", disable=args.no_progress):
        enc, why = _load(spec, args.device)
        if enc is None:
            tqdm.write(f"skipping {spec}: {why}")
            report["encoders"][spec] = {"status": "skipped", "note": why}
        else:
            report["encoders"][spec] = evaluate_encoder(spec, enc, ds, args, full)
            del enc
        report["targets"] = _targets(report["encoders"])
        path.write_text(json.dumps(report, indent=2, default=str))  # after each encoder: long runs
    md = write_markdown(report, args.out / "results.md")
    write_plots(report, args.out)
    print(md)
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except FileNotFoundError as exc:  # a missing dataset (folder, or the photos before `make photos`)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
