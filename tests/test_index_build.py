"""Build, search, update (modify / rename / delete / re-add), verify, repair — against exact ground truth."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from index import (INDEXED, REMOVED, Catalog, EncoderMismatchError, Gallery, IndexLockedError, IngestOptions,
                   SchemaVersionError, StoreError, VectorStore, build_index, repair_index, update_index,
                   verify_index)
from index.layout import IndexDir
from _index_fixtures import copy_photos

OPTS = IngestOptions(workers=2, batch_size=5)


def _rows(index_dir) -> dict[str, object]:
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    try:
        return {r.path: r for r in catalog.find()}
    finally:
        catalog.close()


def _embed_files(encoder, paths) -> np.ndarray:
    """Ground truth: each file embedded on its own, outside the index machinery."""
    import torch

    out = []
    with torch.inference_mode():
        for p in paths:
            with Image.open(p) as im:
                out.append(encoder.embed(encoder.preprocess(im))[0].numpy())
    return np.stack(out)


def _state(index_dir, encoder) -> dict[str, np.ndarray]:
    """path → stored vector, for every indexed row."""
    with Gallery.open(index_dir, encoder=encoder) as g:
        rows = {p: r for p, r in _rows(index_dir).items() if r.status == INDEXED}
        vecs = g.vectors([r.id for r in rows.values()])
    return dict(zip(rows, vecs))


@pytest.fixture()
def built(tmp_path, sample_folder, tiny_lipsim):
    folder = copy_photos(sample_folder, tmp_path / "photos")
    index_dir = tmp_path / "index"
    report = build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    return folder, index_dir, report


def test_build_then_search_equals_bruteforce_numpy(built, tiny_lipsim):
    folder, index_dir, report = built
    files = sorted(folder.iterdir())
    assert report.indexed == len(files) and report.total == len(files) and not report.failed
    truth = _embed_files(tiny_lipsim, files)
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        scores, ids = g.search(truth, k=5)
        paths = [g.paths(row) for row in ids]
    for qi in range(len(files)):
        s = truth @ truth[qi]
        order = np.argsort(-s, kind="stable")[:5]
        assert [files[j] for j in order] == paths[qi]
        assert np.allclose(scores[qi], s[order], atol=1e-5)
    assert verify_index(index_dir).ok


def test_update_with_nothing_changed_reads_nothing_and_keeps_the_version(built, tiny_lipsim):
    folder, index_dir, _ = built
    version = Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]["version"]
    report = update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert report.unchanged == len(list(folder.iterdir())) and report.embedded == 0
    assert report.index_version == version


def test_touched_file_with_same_content_is_not_reembedded(built, tiny_lipsim):
    folder, index_dir, _ = built
    now = time.time() + 100
    os.utime(folder / "moon.png", (now, now))
    report = update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert report.embedded == 0 and report.unchanged == len(list(folder.iterdir()))
    assert _rows(index_dir)["moon.png"].mtime_ns == os.stat(folder / "moon.png").st_mtime_ns


def test_modify_rename_delete_readd_keeps_ids_and_matches_a_clean_build(built, tiny_lipsim, tmp_path):
    folder, index_dir, _ = built
    ids0 = {p: r.id for p, r in _rows(index_dir).items()}
    # modify: new content under the same name
    with Image.open(folder / "coins.png") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "coins.png")
    # rename
    os.rename(folder / "brick.png", folder / "brick-renamed.png")
    # delete
    os.remove(folder / "rocket.png")
    # copy of existing content under a new name
    shutil.copy2(folder / "moon.png", folder / "moon-copy.png")
    report = update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert (report.updated, report.renamed, report.removed, report.reused, report.indexed) == (1, 1, 1, 1, 0)
    assert verify_index(index_dir).ok
    rows = _rows(index_dir)
    assert rows["coins.png"].id == ids0["coins.png"]
    assert rows["brick-renamed.png"].id == ids0["brick.png"] and "brick.png" not in rows
    assert rows["rocket.png"].status == REMOVED
    assert rows["moon-copy.png"].id > max(ids0.values())
    untouched = set(ids0) - {"coins.png", "brick.png", "rocket.png"}
    assert all(rows[p].id == ids0[p] for p in untouched)
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        assert ids0["rocket.png"] not in set(g.ids().tolist())

    # re-add the deleted file: its row comes back under the same id
    from encoder.samples import sample_photo

    sample_photo("rocket").save(folder / "rocket.png")
    report = update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    rows = _rows(index_dir)
    assert rows["rocket.png"].status == INDEXED and rows["rocket.png"].id == ids0["rocket.png"]
    assert verify_index(index_dir).ok

    # the incrementally maintained index equals a clean build of the final folder
    clean_dir = tmp_path / "clean"
    build_index(folder, clean_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    got, want = _state(index_dir, tiny_lipsim), _state(clean_dir, tiny_lipsim)
    assert got.keys() == want.keys()
    for p in want:
        assert np.allclose(got[p], want[p], atol=1e-5), p


def test_flat_store_remove_has_no_id_drift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1000, 1200)
    for factory in ("Flat", "IVF4,Flat", "HNSW8"):
        store = VectorStore.from_vectors(ids, x, factory)
        gone = ids[[0, 5, 50, 51, 199]]
        assert store.remove(gone) == 5
        keep = np.setdiff1d(ids, gone)
        assert np.array_equal(np.sort(store.ids()), keep)
        assert np.allclose(store.reconstruct(keep), x[keep - 1000])
        _, found = store.search(x[keep - 1000], 1, exact=True)
        assert np.array_equal(found[:, 0], keep), factory
        store.add(gone[:2], x[gone[:2] - 1000])  # re-add under the same ids
        assert np.allclose(store.reconstruct(gone[:2]), x[gone[:2] - 1000])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=200), st.integers(1, 200), st.integers(1, 9))
def test_top_rows_equals_a_full_sort_by_score_then_position(values, take, block):
    """`index.store.top_rows` (block maxima, then a selection among the kept blocks) against the
    definition: sort every position by (−score, position) and keep the first `take`. Few distinct
    values, so ties at the take-th score and equal block maxima are the rule, not the exception."""
    from index.store import top_rows

    scores = np.asarray(values, dtype=np.float32) / 4
    take = min(take, len(scores))
    want = np.lexsort((np.arange(len(scores)), -scores))[:take]
    assert np.array_equal(top_rows(scores, take, block), want)


def test_top_rows_on_a_million_scores_with_planted_ties():
    from index.store import top_rows

    rng = np.random.default_rng(3)
    scores = rng.standard_normal(1_000_003).astype(np.float32)
    scores[[5, 70_000, 999_999, 1_000_002]] = scores.max()  # four-way tie at the top
    scores[rng.choice(len(scores), 500, replace=False)] = np.sort(scores)[-60]  # many equal to the 60th
    for take in (1, 4, 74, 200):
        want = np.lexsort((np.arange(len(scores)), -scores))[:take]
        assert np.array_equal(top_rows(scores, take), want)


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])  # HNSW: exact=True scans its flat storage
@pytest.mark.parametrize("nq", [1, 7, 19, 20])  # 20: FAISS's own search
def test_flat_search_of_few_queries_equals_an_independent_top_k_ties_in_storage_order(nq, factory):
    """`VectorStore.search` on a flat index (the store's own scan for < 20 queries, FAISS's search from 20)
    returns the exact top-k: float64 recomputation agrees within the float32 error bound, equal scores
    keep the order in which their rows were stored (copies of a file share a vector), removals and
    re-adds keep ids paired with their vectors, and k beyond the gallery pads with ids −1 (score −FLT_MAX)."""
    from encoder.certify import float32_dot_error
    from index.store import FLAT_SCAN_MAX_QUERIES

    assert FLAT_SCAN_MAX_QUERIES == 20
    rng = np.random.default_rng(nq)
    x = rng.standard_normal((300, 24)).astype(np.float64)
    x[100:110] = x[7]  # ten exact copies of row 7: a tie at every query
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(5000, 5300))
    store = VectorStore.from_vectors(ids, x, factory, use_gpu=False)
    gone = ids[[0, 3, 104, 250]]
    store.remove(gone)
    store.add(gone[:2], x[[0, 3]])  # re-added: their rows now come last
    stored_ids = store.ids()
    stored = store.reconstruct(stored_ids).astype(np.float64)
    q = x[[7] + list(rng.integers(0, 300, nq - 1))] + 0.05 * rng.standard_normal((nq, 24))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 12, 400):
        scores, found = store.search(q, k, exact=True)
        assert scores.shape == found.shape == (nq, k)
        for i in range(nq):
            exact = stored @ q[i].astype(np.float32).astype(np.float64)
            take = min(k, len(stored_ids))
            got = found[i, :take]
            assert (found[i, take:] == -1).all() and (scores[i, take:] == -np.finfo(np.float32).max).all()
            assert len(set(got.tolist())) == take
            pos = {int(v): j for j, v in enumerate(stored_ids)}
            err = 2 * float32_dot_error(24)
            assert np.allclose(scores[i, :take], exact[[pos[int(v)] for v in got]], atol=err)
            # nothing left out scores above what was listed (beyond float32 error)
            left = np.setdiff1d(stored_ids, got)
            if len(left):
                assert exact[[pos[int(v)] for v in left]].max() <= exact[[pos[int(v)] for v in got]].min() + err
            if i == 0 and nq < FLAT_SCAN_MAX_QUERIES and k >= 12:  # query 0 is near the copies of row 7
                copies = [int(v) for v in got if np.array_equal(store.reconstruct([int(v)])[0],
                                                                 store.reconstruct([int(ids[7])])[0])]
                assert copies == sorted(copies, key=pos.get)  # storage order among equal scores
    bad = q.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        store.search(bad, 5)


@pytest.mark.parametrize("factory", ["HNSW8", "IVF2,Flat"])
def test_approximate_index_types_record_params_and_search_exactly_on_demand(tmp_path, tiny_lipsim, factory):
    # 80 small images: enough for IVF2 to be trained (≥ 39 vectors per list), else it stays Flat.
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    index_dir = tmp_path / "index"
    report = build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, index_type=factory,
                         options=IngestOptions(workers=2, batch_size=40))
    assert report.index_type == factory
    meta = Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]
    assert meta["factory"] == factory and meta["params"]
    files = sorted(folder.iterdir())
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        ids_by_path = {r.path: r.id for r in g.records(g.ids())}
        vecs = g.vectors([ids_by_path[p.name] for p in files])
        _, found = g.search(vecs, k=3, exact=True)
    for qi in range(len(files)):
        order = np.argsort(-(vecs @ vecs[qi]), kind="stable")[:3]
        assert list(found[qi]) == [ids_by_path[files[j].name] for j in order]
    os.remove(folder / "07.png")
    assert update_index(index_dir, encoder=tiny_lipsim, options=OPTS).removed == 1
    assert verify_index(index_dir).ok
    assert Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]["factory"] == factory


def test_an_update_that_finds_the_folder_empty_changes_nothing_unless_told(built, tiny_lipsim, tmp_path):
    import dataclasses

    from index import FolderError

    folder, index_dir, report = built
    away = tmp_path / "away"
    folder.rename(away)
    folder.mkdir()  # an unmounted drive: the mount point is there, empty
    version = Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]["version"]
    for run in (update_index, repair_index):
        with pytest.raises(FolderError, match="holds no files now.*nothing was changed.*--allow-empty"):
            run(index_dir, encoder=tiny_lipsim, options=OPTS)
    meta = Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]
    assert meta["version"] == version and meta["rows"] == report.total and verify_index(index_dir).ok
    update_index(index_dir, encoder=tiny_lipsim, options=dataclasses.replace(OPTS, allow_empty=True))
    assert Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]["rows"] == 0


def test_ivf_requested_on_a_small_gallery_stays_exact_until_it_can_be_trained(built, tiny_lipsim):
    folder, index_dir, _ = built
    report = build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, index_type="IVF64,Flat")
    meta = Catalog.open(IndexDir(index_dir).catalog_url()).meta()["index"]
    assert report.index_type == "Flat" and meta["requested"] == "IVF64,Flat"
    assert verify_index(index_dir).ok
    assert any(f"stays Flat (exact search) until it holds {64 * 39:,} vectors" in w for w in report.warnings)


def test_catalog_refuses_a_newer_schema(built):
    _, index_dir, _ = built
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    catalog.set_meta({"schema_version": 99})
    catalog.close()
    with pytest.raises(SchemaVersionError, match="newer"):
        Gallery.open(index_dir)


def test_writer_connections_get_a_large_page_cache_and_readers_touch_no_pragma(built):
    """The writer's cache keeps the content_hash index in memory across checkpoints (docs/benchmarks.md,
    "Catalog commits"); readers set nothing (they may be on read-only media)."""
    from index.catalog import WRITER_CACHE_KIB

    url = IndexDir(built[1]).catalog_url()
    for read_only, expected in ((False, -WRITER_CACHE_KIB), (True, -2000)):  # -2000: SQLite's default
        catalog = Catalog.open(url, read_only=read_only)
        try:
            with catalog.engine.connect() as c:
                assert c.exec_driver_sql("PRAGMA cache_size").scalar() == expected
        finally:
            catalog.close()


def test_encoders_are_never_mixed(built, tiny_lipsim):
    from encoder import load_encoder

    folder, index_dir, _ = built
    other = load_encoder("pixels:16")
    with pytest.raises(EncoderMismatchError):
        build_index(folder, index_dir, "pixels:16", encoder=other)
    with pytest.raises(EncoderMismatchError):
        Gallery.open(index_dir, encoder=other)
    reseeded = load_encoder("lipsim:cpu-tiny", seed=1)  # same name and shape, other weights
    with pytest.raises(EncoderMismatchError, match="weights"):
        update_index(index_dir, encoder=reseeded)


def test_second_writer_is_refused_while_one_holds_the_lock(built, tiny_lipsim):
    _, index_dir, _ = built
    with IndexDir(index_dir).writer_lock():
        with pytest.raises(IndexLockedError):
            update_index(index_dir, encoder=tiny_lipsim)


def test_verify_detects_tampering_and_repair_fixes_it(built, tiny_lipsim):
    folder, index_dir, _ = built
    layout = IndexDir(index_dir)
    meta = Catalog.open(layout.catalog_url()).meta()["index"]
    live = layout.index_file(meta["version"])
    # 1. an orphan vector slipped into the file behind the catalog's back
    store = VectorStore.read(live, meta["factory"])
    store.add([999_999], np.eye(1, store.dim, dtype=np.float32))
    store.write(live)
    report = verify_index(index_dir)
    assert not report.ok and any(p.startswith("checksum") for p in report.problems)
    assert any(p.startswith("rows") for p in report.problems)
    assert any("orphans" in p for p in report.problems)
    with pytest.raises(StoreError, match="repair"):
        update_index(index_dir, encoder=tiny_lipsim)
    repair_index(index_dir, encoder=tiny_lipsim)
    assert verify_index(index_dir).ok
    # 2. the index file is lost entirely: repair re-embeds every file
    meta = Catalog.open(layout.catalog_url()).meta()["index"]
    os.remove(layout.index_file(meta["version"]))
    assert any(p.startswith("file") for p in verify_index(index_dir).problems)
    report = repair_index(index_dir, encoder=tiny_lipsim)
    assert report.embedded == len(list(folder.iterdir()))
    assert verify_index(index_dir).ok
    assert any("rebuilding it from the files" in w for w in report.warnings)
    assert not any("run `robret index repair" in w for w in report.warnings)  # (it is that repair)


def test_leftover_temporary_files_are_reported_then_cleaned(built, tiny_lipsim):
    _, index_dir, _ = built
    layout = IndexDir(index_dir)
    (layout.path / "vectors.00000099.faiss.tmp").write_bytes(b"torn write")
    (layout.path / "vectors.00000098.faiss").write_bytes(b"old")
    report = verify_index(index_dir)
    assert report.ok and len(report.notes) == 2
    update_index(index_dir, encoder=tiny_lipsim)
    assert not layout.leftovers(Catalog.open(layout.catalog_url()).meta()["index"]["version"])


def test_catalog_at_another_sqlalchemy_url(tmp_path, sample_folder, tiny_lipsim):
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins", "camera"))
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=url)
    assert (tmp_path / "elsewhere.db").is_file() and not (index_dir / "catalog.sqlite").exists()
    assert json.loads((index_dir / "robret-index.json").read_text())["catalog"] == url
    os.remove(folder / "moon.png")
    assert update_index(index_dir, encoder=tiny_lipsim).removed == 1
    assert verify_index(index_dir).ok


def test_update_finishes_a_build_killed_before_its_catalog_existed(tmp_path, sample_folder, tiny_lipsim):
    # The configuration is written first; a build killed right after it leaves no catalog yet.
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins"))
    index_dir = tmp_path / "index"
    IndexDir(index_dir).write_config(None, str(folder), "lipsim:cpu-tiny", "auto")
    report = update_index(index_dir, encoder=tiny_lipsim)
    assert report.indexed == 2 and verify_index(index_dir).ok


def test_a_cached_index_is_rebuilt_when_its_spec_now_names_other_weights_but_a_users_is_refused(
        sample_folder, tmp_path, tiny_lipsim):
    # `robret demo` and the page build into directories robret owns: after a bundled model is retrained
    # (same spec, new weights) they rebuild; build_index on a user's directory still refuses the mix.
    from encoder import LipSimEncoder, get_preset
    from index import build_cache_index

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("camera", "coins", "moon"))
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    retrained = LipSimEncoder(get_preset("cpu-tiny"), name="lipsim:cpu-tiny").freeze()
    cache, user = tmp_path / "cache-index", tmp_path / "user-index"
    for d in (cache, user):
        build_index(folder, d, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    with pytest.raises(EncoderMismatchError):
        build_index(folder, user, "lipsim:cpu-tiny", encoder=retrained, options=OPTS)
    report = build_cache_index(folder, cache, "lipsim:cpu-tiny", encoder=retrained, options=OPTS)
    assert report.embedded == 3 and verify_index(cache).ok
    with Gallery.open(cache, encoder=retrained) as g:
        want = retrained.embed(torch.cat([retrained.preprocess(Image.open(folder / f"{n}.png"))
                                          for n in ("camera", "coins", "moon")])).numpy()
        scores, _ = g.search(want, 1)
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4)  # every image's new embedding is stored
    with pytest.raises(EncoderMismatchError):
        Gallery.open(cache, encoder=tiny_lipsim)
    assert build_cache_index(folder, cache, "lipsim:cpu-tiny", encoder=retrained, options=OPTS).unchanged == 3
