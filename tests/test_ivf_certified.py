"""Certified IVF search (index/ivf.py, retrieval/ivf_search.py) against the exhaustive certificate.

Galleries are random clustered unit vectors (`benchmarks.certified_search.clustered_unit_vectors`);
the reference is `encoder.certify.certify_topk_bruteforce` over the whole gallery (every pair, no pruning),
and attacks run on the brute-force ranking of the whole gallery, independently of the IVF code.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _pgd import attack_certified_sets
from benchmarks.certified_search import clustered_unit_vectors
from encoder.certify import certify_topk_bruteforce, float32_dot_error, slack_for
from index.errors import IntegrityError
from index.ivf import CertifiedIVF, exact_radius_bounds
from index.store import VectorStore
from retrieval.ivf_search import certified_ivf_search

TOL = 1e-9  # float64 slack between two computations of the same radius


def _gallery(n, dim, clusters, seed):
    return clustered_unit_vectors(n, dim, clusters, seed=seed), clustered_unit_vectors(6, dim, clusters, seed, 9)


def _exhaustive(q, x, k, slack, lipschitz=1.0):
    """The reference: every pair (top-k, other) scored, no pruning and no bound on unlisted items."""
    return certify_topk_bruteforce(q, x, k, lipschitz, slack=slack)


def _recomputed_bounds(ivf):
    return np.array([np.linalg.norm(lst.vectors.astype(np.float64) - c, axis=1).max() if len(lst.ids) else 0.0
                     for c, lst in zip(ivf.centroids.astype(np.float64), ivf.lists)])


gallery_params = st.fixed_dictionaries({
    "n": st.integers(30, 400), "dim": st.integers(3, 24), "clusters": st.integers(1, 12),
    "nlist": st.integers(1, 16), "k": st.integers(1, 8), "seed": st.integers(0, 2**16),
    "float_error": st.sampled_from([0.0, 1e-7, 1e-5]),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=gallery_params, budget=st.one_of(st.none(), st.integers(1, 16)))
# A budget spent on a first list holding fewer than k items: the top-k holds an unseen item (found by this test).
@example(p={"n": 30, "dim": 3, "clusters": 4, "nlist": 6, "k": 2, "seed": 45, "float_error": 0.0}, budget=1)
@example(p={"n": 30, "dim": 3, "clusters": 2, "nlist": 8, "k": 2, "seed": 45, "float_error": 0.0}, budget=1)
def test_ivf_certificate_is_never_larger_than_the_exhaustive_one_and_equal_without_a_budget(p, budget):
    x, queries = _gallery(p["n"], p["dim"], p["clusters"], p["seed"])
    ivf = CertifiedIVF.build(np.arange(p["n"]), x, min(p["nlist"], p["n"]), seed=p["seed"])
    slack = slack_for(p["float_error"], ivf.max_norm)
    k = min(p["k"], p["n"])
    for q in queries:
        upper = ivf.upper_bounds(q)
        for c, lst in enumerate(ivf.lists):
            assert np.all(lst.vectors.astype(np.float64) @ q.astype(np.float64) <= upper[c])
        pos, radius, set_radius = _exhaustive(q, x, k, slack)
        got = certified_ivf_search(ivf, q, k, 1.0, slack=slack, probe_budget=budget, first_probes=1)
        assert got.cert.set_radius <= set_radius + TOL
        if got.cert.set_radius > 0:  # a positive radius proves the top-k: it must be the true one
            assert set(got.ids.tolist()) == set(pos.tolist())
            assert np.all(got.cert.radius <= radius + TOL)
        if got.exact_topk:
            assert set(got.ids.tolist()) == set(pos.tolist())
        if budget is None:
            assert got.exhaustive and not got.budget_hit
        if got.exhaustive:
            assert got.ids.tolist() == pos.tolist()
            np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)
        else:
            assert got.budget_hit and got.lists_visited <= budget


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=gallery_params, budget=st.one_of(st.none(), st.integers(1, 4)), layered=st.booleans())
def test_pgd_never_changes_the_topk_inside_the_ivf_certificate(p, budget, layered):
    # The attacked "encoder" is e(x) = 2x − 1 on [0,1]^D (2-Lipschitz), whose clean input maps to the query:
    # the PGD below only sees the whole gallery's brute-force ranking (the live vectors as stored). Lists built
    # here, or a FAISS base with a segment layered on it.
    x, queries = _gallery(p["n"], p["dim"], p["clusters"], p["seed"])
    nlist = min(p["nlist"], p["n"])
    ivf = _layered(x, nlist, p["seed"]) if layered else CertifiedIVF.build(np.arange(p["n"]), x, nlist, seed=p["seed"])
    k = min(p["k"], p["n"] - 1) or 1
    slack = slack_for(p["float_error"], ivf.max_norm)
    found = [(q, certified_ivf_search(ivf, q, k, 2.0, slack=slack, probe_budget=budget, first_probes=1))
             for q in queries]
    best = attack_certified_sets(_stored(ivf), found)
    assert torch.all(best < 0), best


def test_adding_and_removing_keeps_every_radius_bound_an_upper_bound():
    rng = np.random.default_rng(3)
    x = clustered_unit_vectors(600, 12, 6, seed=1)
    ivf = CertifiedIVF.build(np.arange(600), x, 8, seed=0)
    np.testing.assert_allclose(ivf.rho, _recomputed_bounds(ivf), rtol=1e-8)  # exact at build
    before = ivf.rho.copy()
    far = rng.standard_normal((40, 12)).astype(np.float32)  # anywhere on the sphere: enlarges lists
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    ivf.add(np.arange(1000, 1040), far)
    assert np.all(ivf.rho >= before) and np.any(ivf.rho > before)  # only ever increased
    assert np.all(ivf.rho >= _recomputed_bounds(ivf))
    removed = ivf.remove(np.concatenate([np.arange(0, 600, 3), np.arange(1000, 1040, 2), [99999]]))
    assert removed == 200 + 20 and len(ivf) == 640 - 220
    assert np.all(ivf.rho >= _recomputed_bounds(ivf))  # still upper bounds over what is left
    assert np.any(ivf.rho > _recomputed_bounds(ivf) * (1 + 1e-6))  # and now loose somewhere
    ivf.recompute_bounds()
    np.testing.assert_allclose(ivf.rho, _recomputed_bounds(ivf), rtol=1e-8)
    assert np.all(ivf.rho >= _recomputed_bounds(ivf))
    # Certificates after the changes still equal the exhaustive ones over the items left.
    ids = ivf.ids()
    vecs = np.concatenate([lst.vectors for lst in ivf.lists])
    slack = slack_for(1e-6, ivf.max_norm)
    for q in clustered_unit_vectors(5, 12, 6, seed=1, stream=4):
        pos, radius, _ = _exhaustive(q, vecs, 5, slack)
        got = certified_ivf_search(ivf, q, 5, 1.0, slack=slack)
        assert got.exhaustive and got.ids.tolist() == ids[pos].tolist()
        np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


def test_list_bound_covers_every_item_score_including_float32_rounding():
    x = clustered_unit_vectors(2000, 129, 20, seed=5)
    ivf = CertifiedIVF.build(np.arange(2000), x, 16, seed=0)
    for q in clustered_unit_vectors(20, 129, 20, seed=5, stream=3):
        upper = ivf.upper_bounds(q)
        for c, lst in enumerate(ivf.lists):
            if len(lst.ids):
                assert (lst.vectors.astype(np.float64) @ q.astype(np.float64)).max() <= upper[c]
    assert exact_radius_bounds(ivf.centroids[0], np.zeros((0, 129), np.float32)) == 0.0


def test_excluded_ids_leave_the_ivf_answer_and_its_certificate():
    x = clustered_unit_vectors(500, 16, 5, seed=2)
    ivf = CertifiedIVF.build(np.arange(500), x, 8)
    q = x[17]
    slack = slack_for(1e-6, ivf.max_norm)
    drop = [17, int(np.argsort(-(x @ q))[1])]
    keep = np.setdiff1d(np.arange(500), drop)
    pos, radius, _ = _exhaustive(q, x[keep], 4, slack)
    got = certified_ivf_search(ivf, q, 4, 1.0, slack=slack, exclude=drop)
    assert got.ids.tolist() == keep[pos].tolist() and got.exhaustive
    np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


def test_faiss_ivf_view_and_memory_mapped_copy_give_the_exhaustive_certificate(tmp_path):
    x = clustered_unit_vectors(3000, 32, 30, seed=4)
    ids = np.arange(5000, 8000)
    store = VectorStore.from_vectors(ids, x, "IVF16,Flat", use_gpu=False)
    ivf = CertifiedIVF.from_faiss(store.index)
    assert len(ivf) == 3000 and sorted(ivf.ids().tolist()) == ids.tolist()
    manifest = ivf.save(tmp_path / "ivf")
    mapped = CertifiedIVF.open(tmp_path / "ivf")
    assert manifest["count"] == 3000 and isinstance(mapped.lists[0].vectors, np.memmap)
    np.testing.assert_array_equal(mapped.rho, ivf.rho)
    stored = store.reconstruct(ids)  # what the index holds (renormalised), the certificate's vectors
    slack = slack_for(1e-6, ivf.max_norm)
    for q in clustered_unit_vectors(5, 32, 30, seed=4, stream=2):
        pos, radius, _ = _exhaustive(q, stored, 10, slack)
        for source in (ivf, mapped):
            got = certified_ivf_search(source, q, 10, 1.0, slack=slack)
            assert got.exhaustive and got.ids.tolist() == ids[pos].tolist()
            np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


def test_streamed_build_equals_the_in_memory_one_and_a_flipped_byte_is_refused(tmp_path):
    x = clustered_unit_vectors(1500, 20, 10, seed=6)
    mem = CertifiedIVF.build(np.arange(1500), x, 8, seed=0)

    def chunks():
        for s in range(0, 1500, 400):
            yield np.arange(s, min(s + 400, 1500)), x[s:s + 400]

    CertifiedIVF.write_streamed(tmp_path / "s", mem.centroids, chunks)
    disk = CertifiedIVF.open(tmp_path / "s")
    for a, b in zip(mem.lists, disk.lists):
        assert sorted(a.ids.tolist()) == sorted(b.ids.tolist())
    np.testing.assert_allclose(disk.rho, mem.rho, rtol=1e-12)
    assert disk.max_norm == pytest.approx(mem.max_norm, rel=1e-12)
    path = tmp_path / "s" / "vectors.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        CertifiedIVF.open(tmp_path / "s")


def test_a_gallery_on_an_ivf_index_answers_certified_queries_from_its_lists(tmp_path, tiny_lipsim, capsys):
    from PIL import Image

    from encoder.certify import certify_topk_bruteforce
    from index import Gallery
    from index.ingest import IngestOptions, build_index
    from retrieval.search import search_embedding

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):  # enough for IVF2 to be trained (≥ 39 vectors per list)
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, index_type="IVF2,Flat",
                options=IngestOptions(workers=2, batch_size=40))
    with Gallery.open(tmp_path / "index", encoder=tiny_lipsim) as g:
        assert g.certified_ivf is not None and g.certified_ivf.nlist == 2
        ids, vecs = g.all_vectors()
        assert g.max_norm >= np.linalg.norm(vecs.astype(np.float64), axis=1).max()
        q = vecs[5]
        res = search_embedding(g, q, k=4, exclude=[int(ids[5])])
        flat = search_embedding(g, q, k=4, exclude=[int(ids[5])], probe_budget=1)
        plain = search_embedding(g, q, k=4, exclude=[int(ids[5])], certify=False, probe_budget=2)
        quick = search_embedding(g, q, k=4, exclude=[int(ids[5])], certify=False)  # the index's nprobe = 1
    keep = np.arange(len(ids)) != 5
    top, radius, set_radius = certify_topk_bruteforce(q, vecs[keep], 4, 1.0, slack=res.slack)
    assert res.method == "certified-ivf" and res.exhaustive and res.exact_topk
    assert [h.id for h in res.hits] == ids[keep][top].tolist()
    np.testing.assert_allclose([h.radius for h in res.hits], radius, rtol=1e-9)
    assert res.to_dict()["method"] == "certified-ivf"
    assert plain.method == "certified-ivf" and plain.exact_topk and plain.set_radius is None
    assert [h.id for h in plain.hits] == [h.id for h in res.hits]
    assert quick.lists_visited == 1
    assert ([h.id for h in quick.hits] == [h.id for h in res.hits]) if quick.exact_topk else \
        any("may miss" in n for n in quick.notes)
    assert flat.set_radius <= set_radius + TOL
    if not flat.exhaustive:
        assert any("probe budget" in n for n in flat.notes)
    from retrieval.cli import main

    capsys.readouterr()
    assert main(["query", str(folder / "05.png"), "--index-dir", str(tmp_path / "index"), "-k", "3",
                 "--probe-budget", "1", "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["method"] == "certified-ivf" and out["lists_visited"] == 1 and len(out["hits"]) == 3


def test_quick_certified_search_benchmark_matches_the_exhaustive_certificate(tmp_path, capsys):
    from benchmarks.certified_search import REGIMES, main

    out = tmp_path / "cs.json"
    assert main(["--quick", "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    rows = __import__("json").loads(out.read_text())
    assert sorted(r["regime"] for r in rows) == sorted(REGIMES)
    for r in rows:
        assert r["radius_larger"] == 0 and r["radius_equal"] == r["queries"] == 10
        assert r["ivf_proved_exhaustive"] == r["queries"]
        assert r["ivf"]["p50_ms"] > 0 and r["exhaustive"]["p50_ms"] > 0
    assert "| near-duplicates | 5,000 |" in capsys.readouterr().out


def test_memory_mapped_lists_scanned_at_once_give_the_same_certificate_with_exclusions(tmp_path):
    x = clustered_unit_vectors(800, 16, 20, seed=8)
    mem = CertifiedIVF.build(np.arange(800), x, 8, seed=0)
    mem.save(tmp_path / "m")
    disk = CertifiedIVF.open(tmp_path / "m")
    assert disk.contiguous() is not None and mem.contiguous() is None
    slack = slack_for(1e-6, mem.max_norm)
    for q in clustered_unit_vectors(4, 16, 20, seed=8, stream=5):
        drop = np.argsort(-(x @ q))[:3]  # the three best items are excluded
        keep = np.setdiff1d(np.arange(800), drop)
        pos, radius, _ = _exhaustive(q, x[keep], 5, slack)
        for first in (1, 8):  # a list at a time, or (a chunk ≥ a quarter of the lists) all at once
            got = certified_ivf_search(disk, q, 5, 1.0, slack=slack, exclude=drop, first_probes=first)
            assert got.exhaustive and got.ids.tolist() == keep[pos].tolist()
            np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)
    disk.remove([0])
    assert disk.contiguous() is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=gallery_params, budget=st.one_of(st.none(), st.integers(1, 16)))
def test_plain_ivf_topk_flagged_exact_is_the_exhaustive_topk(p, budget):
    x, queries = _gallery(p["n"], p["dim"], p["clusters"], p["seed"])
    ivf = CertifiedIVF.build(np.arange(p["n"]), x, min(p["nlist"], p["n"]), seed=p["seed"])
    k = min(p["k"], p["n"])
    for q in queries:
        truth = np.argsort(-(x.astype(np.float64) @ q.astype(np.float64)), kind="stable")[:k]
        got = certified_ivf_search(ivf, q, k, 1.0, slack=0.0, probe_budget=budget, first_probes=1, radii=False)
        if budget is None:
            assert got.exact_topk
        if got.exact_topk:
            assert got.ids.tolist() == truth.tolist()
        if budget is None:  # same schedule, fewer conditions: never more lists than a certificate needs
            full = certified_ivf_search(ivf, q, k, 1.0, slack=0.0, first_probes=1)
            assert got.lists_visited <= full.lists_visited


def _exact_max_norm(rows) -> float:
    """max_j ‖e_j‖ from the exact squares (a float32 squared is exact in float64) summed by math.fsum
    (correctly rounded): within ~1e-16 relative of the true value."""
    import math
    return max(math.sqrt(math.fsum(float(x) ** 2 for x in row.astype(np.float64))) for row in rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.integers(1, 300), n=st.integers(1, 6), seed=st.integers(0, 2 ** 32 - 1),
       scale=st.sampled_from([1.0, 1e-20, 1e-41, 3e18, 0.7]), spread=st.booleans())
@example(dim=129, n=3, seed=0, scale=1.0, spread=False)
def test_norm_bound_is_never_below_the_exact_largest_norm_and_within_its_float32_allowance(dim, n, seed, scale, spread):
    """`norm_bound` from float32 squared norms against exact arithmetic, on rows built to round one way
    (equal components, whose float32 squares all round alike), with wide exponent spread, at the edge of
    the subnormals (1e-41) and large ones."""
    from index.ivf import norm_bound
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, dim)) if spread else np.full((n, dim), 1 / np.sqrt(dim)) * (1 + rng.random((n, 1)))
    if spread:
        rows *= 10.0 ** rng.uniform(-6, 0, (n, dim))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True) * scale).astype(np.float32)
    exact = _exact_max_norm(rows)
    bound = norm_bound(rows)
    assert bound >= exact
    # tight: γ_{D+1} relative, plus `_up`'s allowances and the underflow term
    assert bound <= exact * (1 + 1.1 * (dim + 1) * 2.0 ** -24 + 2e-9) + 1e-12 + np.sqrt(2 * dim * 2.0 ** -149)


def test_norm_bound_on_unit_vectors_of_every_stored_kind():
    from index.ivf import norm_bound
    from index.mapped import MappedFlat
    x = clustered_unit_vectors(3000, 129, 30, seed=4)
    x[17] *= np.float32(1 + 3e-7)  # one vector a little longer than the rest
    exact = _exact_max_norm(x)
    assert exact <= norm_bound(x) <= exact * (1 + 1e-5)
    assert norm_bound(x[:0]) == 0.0 and norm_bound(x, chunk=7) == norm_bound(x)
    flat = MappedFlat(129)
    flat.add(np.arange(3000), x, stored=True)
    assert flat.max_norm() == norm_bound(x)
    flat.remove([17])
    assert _exact_max_norm(np.delete(x, 17, 0)) <= flat.max_norm() < norm_bound(x)
    store = VectorStore.from_vectors(np.arange(3000), x / np.linalg.norm(x, axis=1, keepdims=True), use_gpu=False)
    assert store.max_norm() >= _exact_max_norm(store.reconstruct(store.ids()))


def _stored(ivf):
    """Every vector as `ivf` holds it, by id 0..n−1 (a FAISS-backed store keeps them renormalised)."""
    ids = ivf.ids()
    vecs = np.concatenate([ivf.list_vectors(c)[1] for c in range(ivf.nlist)])
    out = np.empty_like(vecs)
    out[ids] = vecs
    return out


def _three_kinds(x, nlist, tmp_path, seed=0):
    """The same gallery as in-memory lists, a saved (contiguous, mapped) copy, a FAISS IVF's own lists, and
    a FAISS IVF with segments layered on it (index/mapped_ivf.py: a fifth of the ids stored in the base with
    other vectors, removed by a segment that adds them back with theirs)."""
    mem = CertifiedIVF.build(np.arange(len(x)), x, nlist, seed=seed)
    mem.save(tmp_path / f"ivf-{seed}-{nlist}")
    store = VectorStore.from_vectors(np.arange(len(x)), x, f"IVF{nlist},Flat", use_gpu=False)
    return {"memory": mem, "saved": CertifiedIVF.open(tmp_path / f"ivf-{seed}-{nlist}"),
            "faiss": CertifiedIVF.from_faiss(store.index), "layered": _layered(x, nlist, seed)}


def _layered(x, nlist, seed=0):
    """The lists of a FAISS IVF base with a segment layered on it (index/mapped_ivf.py): a fifth of the ids stored
    in the base with other vectors (dead), removed by the segment, which adds them back with theirs."""
    from index.mapped_ivf import LayeredIVF

    moved = np.random.default_rng(seed).choice(len(x), len(x) // 5, replace=False)
    old = x.copy()
    old[moved] = np.roll(x, 1, axis=0)[moved]  # the dead versions: other gallery vectors
    layered = LayeredIVF(VectorStore.from_vectors(np.arange(len(x)), old, f"IVF{nlist},Flat", use_gpu=False))
    assert layered.remove(moved) == len(moved)
    layered.add(moved, np.ascontiguousarray(x[moved]), stored=True)
    return layered.certified_lists()


@pytest.mark.parametrize("split", [False, True])
def test_top_in_lists_leaves_out_only_items_below_k_returned_ones(tmp_path, monkeypatch, split):
    # The contract certified search's pool relies on, checked against every item's recomputed score, on each
    # kind of lists, with exclusions, and with FAISS scans split over threads (parts of ≥ 50 items).
    import index.ivf as ivf_module
    if split:
        monkeypatch.setattr(ivf_module, "SPLIT_MIN", 50)
    x = clustered_unit_vectors(1200, 24, 12, seed=11)
    rng = np.random.default_rng(0)
    for name, ivf in _three_kinds(x, 16, tmp_path).items():
        gamma = float32_dot_error(24, ivf.max_norm, 1.0 + 1e-6)
        for q in clustered_unit_vectors(4, 24, 12, seed=11, stream=3):
            for k in (1, 7, 40, 5000):
                lists = rng.permutation(16)[:rng.integers(1, 17)]
                exclude = rng.choice(1200, rng.integers(0, 30), replace=False)
                scores, refs = ivf.top_in_lists(q, lists, k, exclude)
                ids, vecs = ivf.items(refs)
                exact = vecs @ q.astype(np.float64)
                assert np.all(np.abs(scores - exact) <= gamma), name  # float32 scores of the stored vectors
                assert len(set(refs.tolist())) == len(refs) and not np.isin(ids, exclude).any()
                assert np.array_equal(vecs, _stored(ivf)[ids].astype(np.float64)), name  # live versions only
                members = np.concatenate([ivf.list_vectors(int(c))[0] for c in lists])
                assert np.isin(ids, members).all()
                left = np.setdiff1d(members, np.concatenate([ids, exclude]))
                if len(left):
                    assert len(scores) >= k, name
                    left_scores = _stored(ivf)[left].astype(np.float64) @ q.astype(np.float64)
                    assert left_scores.max() <= np.sort(scores)[-k] + gamma, name
                else:
                    assert len(scores) == len(np.setdiff1d(members, exclude))


def test_layered_lists_ask_again_when_dead_items_crowd_the_best(monkeypatch):
    # 200 dead base items are the query's nearest: a scan's first answer (k + 16) is nearly all dead, and the
    # part scan must ask FAISS again until k live items are kept (index/ivf.py `_faiss_part`), split or not.
    import index.ivf as ivf_module
    from index.mapped_ivf import LayeredIVF
    x = clustered_unit_vectors(2000, 16, 20, seed=4)
    q = x[0]
    old = x.copy()
    dead = np.arange(1, 201)
    near = q + 1e-3 * np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    old[dead] = near / np.linalg.norm(near, axis=1, keepdims=True)
    layered = LayeredIVF(VectorStore.from_vectors(np.arange(2000), old, "IVF8,Flat", use_gpu=False))
    assert layered.remove(dead) == 200
    layered.add(dead, np.ascontiguousarray(x[dead]), stored=True)
    lists = layered.certified_lists()
    stored = _stored(lists)
    truth = stored.astype(np.float64) @ q.astype(np.float64)
    for split in (False, True):
        monkeypatch.setattr(ivf_module, "SPLIT_MIN", 100 if split else 1 << 16)
        for k in (1, 5, 40):
            scores, refs = lists.top_in_lists(q, np.arange(8), k)
            ids, vecs = lists.items(refs)
            assert np.array_equal(vecs, stored[ids].astype(np.float64))  # never a dead version
            assert set(np.argsort(-truth, kind="stable")[:k].tolist()) <= set(ids.tolist())
        pos, radius, _ = _exhaustive(q, stored, 5, 0.0)
        got = certified_ivf_search(lists, q, 5, 1.0, slack=0.0, cap=8)
        assert got.exhaustive and got.ids.tolist() == pos.tolist()
        np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=gallery_params, cap=st.integers(1, 12), drop=st.integers(0, 6), split=st.booleans())
def test_certificate_with_a_short_exact_list_and_kinds_of_lists_equals_the_exhaustive_one(p, cap, drop, split):
    # A small cap makes every scan leave items out and the cap double (rescanning every visited list); the
    # three kinds of lists, exclusions and split FAISS scans must all give the exhaustive certificate.
    import tempfile

    import index.ivf as ivf_module
    x, queries = _gallery(p["n"], p["dim"], p["clusters"], p["seed"])
    nlist = max(1, min(p["nlist"], p["n"] // 39))  # FAISS wants ≥ 39 training vectors per list
    k = min(p["k"], p["n"] - drop)
    old = ivf_module.SPLIT_MIN
    ivf_module.SPLIT_MIN = 10 if split else old
    try:
        with tempfile.TemporaryDirectory() as tmp:
            from pathlib import Path
            kinds = _three_kinds(x, nlist, Path(tmp), p["seed"])
            slack = slack_for(p["float_error"], kinds["memory"].max_norm)
            for q in queries[:3]:
                out = np.argsort(-(x.astype(np.float64) @ q.astype(np.float64)))[:drop]
                keep = np.setdiff1d(np.arange(p["n"]), out)
                for name, ivf in kinds.items():
                    pos, radius, _ = _exhaustive(q, _stored(ivf)[keep], k, slack)
                    got = certified_ivf_search(ivf, q, k, 1.0, slack=slack, cap=cap, exclude=out, first_probes=1)
                    assert got.exhaustive and got.ids.tolist() == keep[pos].tolist(), name
                    np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)
                    unlisted = np.setdiff1d(keep, got.listed_ids)  # the bound B the tail term rests on
                    assert np.all(_stored(ivf)[unlisted].astype(np.float64) @ q.astype(np.float64) <= got.bound), name
    finally:
        ivf_module.SPLIT_MIN = old


def test_a_forked_child_scans_lists_on_threads_of_its_own(monkeypatch):
    # The parent's scanning threads do not exist in a forked child; a child that waited on them would hang.
    import multiprocessing

    import index.ivf as ivf_module
    monkeypatch.setattr(ivf_module, "SPLIT_MIN", 50)
    x = clustered_unit_vectors(600, 16, 6, seed=3)
    ivf = CertifiedIVF.from_faiss(VectorStore.from_vectors(np.arange(600), x, "IVF8,Flat", use_gpu=False).index)
    q = x[0]
    parent = ivf.top_in_lists(q, np.arange(8), 5)
    assert ivf_module._EXECUTOR is not None  # the split scan ran on the threads
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_scan_in_child, (ivf, q)).get(timeout=30)
    assert sorted(child) == sorted(parent[0].tolist())


def _scan_in_child(ivf, q):
    return ivf.top_in_lists(q, np.arange(8), 5)[0].tolist()


@pytest.mark.parametrize("copies", [2, 8, 10])
def test_an_excluded_id_stored_many_times_among_the_best_leaves_the_certificate_exhaustive(copies):
    # FAISS is asked for k + |exclude| items and the excluded are dropped after: an id stored more times than
    # that among a scan's best (found by review: a wrong top-3 flagged exhaustive, or None) must ask again.
    x = clustered_unit_vectors(400, 16, 4, seed=1)
    q = x[0].copy()
    ids = np.arange(400)
    ids[np.argsort(-(x.astype(np.float64) @ q.astype(np.float64)))[:copies]] = 7
    ivf = CertifiedIVF.from_faiss(VectorStore.from_vectors(ids, x, "IVF4,Flat", use_gpu=False).index)
    stored_ids = np.concatenate([ivf.list_vectors(c)[0] for c in range(ivf.nlist)])
    stored = np.concatenate([ivf.list_vectors(c)[1] for c in range(ivf.nlist)])
    keep = stored_ids != 7
    pos, radius, _ = _exhaustive(q, stored[keep], 3, 0.0)
    got = certified_ivf_search(ivf, q, 3, 1.0, slack=0.0, cap=1, exclude=[7], first_probes=1)
    assert got is not None and got.exhaustive and got.ids.tolist() == stored_ids[keep][pos].tolist()
    np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


def test_a_faiss_ivf_on_l2_distances_is_certified_on_inner_products():
    # FAISS's own scan of an L2 index keeps the smallest distances: such lists are scored by the kernel instead.
    import faiss
    x = clustered_unit_vectors(2000, 16, 20, seed=2)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 8)
    index.train(x)
    index.add_with_ids(x, np.arange(2000))
    ivf = CertifiedIVF.from_faiss(index)
    for q in (x[5], x[1500]):
        pos, radius, _ = _exhaustive(q, x, 5, 0.0)
        got = certified_ivf_search(ivf, q, 5, 1.0, slack=0.0)
        assert got.exhaustive and got.ids.tolist() == pos.tolist()
        np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


def _ivf_3000(x, source):
    """16 lists over 3,000 vectors, built here ("memory") or FAISS's ("faiss"), and their stored vectors by id."""
    ivf = CertifiedIVF.build(np.arange(3000), x, 16, seed=0) if source == "memory" else \
        CertifiedIVF.from_faiss(VectorStore.from_vectors(np.arange(3000), x, "IVF16,Flat", use_gpu=False).index)
    return ivf, _stored(ivf)


def _far_query(stored, i, noise, seed):
    q = stored[i] + noise * np.random.default_rng(seed).standard_normal(stored.shape[1]).astype(np.float32)
    return (q / np.linalg.norm(q)).astype(np.float32)


@pytest.mark.parametrize("source", ["memory", "faiss"])
def test_a_gallery_item_as_query_is_certified_exhaustively_from_a_short_list(source):
    # Its self-score 1 kept the plain tail bound (s_i − B − slack)/(L·(‖e_i‖ + M)) binding until most of the
    # gallery was listed (~10 s at 1M vectors before cap_max). The bound that knows where an item scoring at most
    # B can lie (`unlisted_radius`) is ~(s_i − B)/(L·√(1 − B²)) for e_i = q: a few items suffice.
    x = clustered_unit_vectors(3000, 16, 30, seed=12)
    ivf, stored = _ivf_3000(x, source)
    for i in (5, 123, 777):
        pos, radius, _ = _exhaustive(stored[i], stored, 3, 0.0)
        got = certified_ivf_search(ivf, stored[i], 3, 1.0, slack=0.0, cap=8, cap_max=None)
        assert got.exhaustive and not got.capped and len(got.listed_ids) <= 16
        assert got.ids.tolist() == pos.tolist()
        np.testing.assert_allclose(got.cert.radius, radius, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("source", ["memory", "faiss"])
def test_a_search_stops_at_the_exact_list_limit_with_a_sound_certificate(source):
    # A query that needs more exactly scored items than cap_max: the search stops at cap_max items, flagged,
    # the certificate still sound and only smaller.
    x = clustered_unit_vectors(3000, 32, 10, seed=12)
    ivf, stored = _ivf_3000(x, source)
    q = _far_query(stored, 2619, 0.1, 2619)
    pos, radius, set_radius = _exhaustive(q, stored, 3, 0.0)
    full = certified_ivf_search(ivf, q, 3, 1.0, slack=0.0, cap=8, cap_max=None)
    assert full.exhaustive and not full.capped and len(full.listed_ids) > 64
    np.testing.assert_allclose(full.cert.radius, radius, rtol=TOL, atol=TOL)
    got = certified_ivf_search(ivf, q, 3, 1.0, slack=0.0, cap=8, cap_max=64)
    assert got.capped and not got.exhaustive and not got.budget_hit and len(got.listed_ids) <= 64
    assert got.exact_topk and got.ids.tolist() == pos.tolist()
    assert np.all(got.cert.radius <= radius + TOL) and got.cert.set_radius <= set_radius + TOL
    assert got.cert.radius[0] > 0  # still a certificate, only smaller
    unlisted = np.setdiff1d(np.arange(3000), got.listed_ids)
    assert np.all(stored[unlisted].astype(np.float64) @ q.astype(np.float64) <= got.bound)


def test_the_exact_list_limit_is_reached_exactly_and_never_stops_a_plain_search():
    # (review) cap_max bounds the list by clamping its last doubling; a plain top-k (radii=False) is not
    # capped: there the list only grows past cap_max for items tied with the k-th, and it must end proved.
    x = clustered_unit_vectors(3000, 32, 10, seed=12)
    ivf = CertifiedIVF.build(np.arange(3000), x, 16, seed=0)
    q = _far_query(_stored(ivf), 2619, 0.1, 2619)
    got = certified_ivf_search(ivf, q, 3, 1.0, slack=0.0, cap=8, cap_max=100)
    assert got.capped and len(got.listed_ids) == 100
    assert certified_ivf_search(ivf, q, 3, 1.0, slack=0.0, cap=512, cap_max=64).listed_ids.size <= 512
    ties = clustered_unit_vectors(3000, 16, 30, seed=3)
    ties[:1500] = ties[0]
    q = ties[0] + 1e-3 * np.random.default_rng(0).standard_normal(16).astype(np.float32)
    q /= np.linalg.norm(q)
    plain = certified_ivf_search(CertifiedIVF.build(np.arange(3000), ties, 16, seed=0), q, 3, 1.0, slack=0.0,
                                 cap_max=64, radii=False)
    assert plain.exact_topk and not plain.capped


def test_concurrent_certified_searches_share_the_scanning_threads(monkeypatch):
    # A server answers requests on several threads, each splitting its scans over the same two workers.
    from concurrent.futures import ThreadPoolExecutor

    import index.ivf as ivf_module
    monkeypatch.setattr(ivf_module, "SPLIT_MIN", 100)
    x = clustered_unit_vectors(4000, 24, 40, seed=21)
    ivf = CertifiedIVF.from_faiss(VectorStore.from_vectors(np.arange(4000), x, "IVF16,Flat", use_gpu=False).index)
    queries = clustered_unit_vectors(24, 24, 40, seed=21, stream=5)
    slack = slack_for(1e-6, ivf.max_norm)

    def answer(q):
        got = certified_ivf_search(ivf, q, 5, 1.0, slack=slack, exclude=[int(np.argmax(x @ q))])
        return got.ids.tolist(), got.cert.radius.tolist(), got.exhaustive

    alone = [answer(q) for q in queries]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(answer, queries))
    assert together == alone and all(e for _, _, e in alone)
