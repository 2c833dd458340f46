"""A GPU copy across a server's reloads and failures (index/gpu_scan.py: `DeviceRows`' reuse, `GpuCopy`'s seed,
deferred copy, stop and failure callbacks; index/gallery.py: `Gallery.prepare_search`).

Without a GPU the same code runs on torch's CPU device (`scan_device` replaced by a stand-in returning it), as in
tests/test_gpu_scan.py: sharing a part is sharing a torch tensor, on any device."""
import logging
import threading

import numpy as np
import pytest
import torch

import index.gallery as gallery_mod
import index.gpu_scan as gpu_scan
from _index_fixtures import unit_rows
from index.gpu_scan import GPU_ERRORS_MAX, DeviceRows, GpuCopy
from index.mapped import MappedFlat

DIM = 33


def _same_answers(a: DeviceRows, b: DeviceRows, seed: int) -> None:
    q = np.vstack([unit_rows(6, seed=seed, dim=a.dim), a.host_rows()[[0, -1]]])
    for k in (1, 10, 60):
        for x, y in zip(a.top(q, k), b.top(q, k)):
            assert np.array_equal(x, y)


def test_a_newer_copy_shares_the_older_copys_parts_in_the_rows_both_hold():
    v = unit_rows(900, seed=21) * np.random.default_rng(21).uniform(0.5, 1.5, (900, 1)).astype(np.float32)
    ids = np.arange(900, dtype=np.int64) * 3
    older = DeviceRows([v[:400], v[400:700]], ids[:700], [5], "cpu", DIM)
    # the same two files mapped again (other arrays, same bytes), then a third; its tombstone clears row 10
    newer = DeviceRows([v[:400].copy(), v[400:700].copy(), v[700:]], ids, [5, 10], "cpu", DIM, reuse=(older, 700))
    assert newer.reused == 700 and newer.parts[0] is older.parts[0] and newer.parts[1] is older.parts[1]
    fresh = DeviceRows([v[:400], v[400:700], v[700:]], ids, [5, 10], "cpu", DIM)
    assert fresh.reused == 0 and newer.max_norm == fresh.max_norm
    assert np.array_equal(newer.host_rows(), v) and np.array_equal(fresh.host_rows(), v)
    _same_answers(newer, fresh, seed=22)
    assert newer.top(v[10:11], 1)[1][0, 0] != ids[10]  # (this version's dead rows, not the older one's)


@pytest.mark.parametrize("case, shared", [("fewer shared rows", 400), ("other ids", 400), ("another first row", 400),
                                          ("another last row", 400), ("a dead row alive", 400), ("other bounds", 0),
                                          ("another dimension", 0)])
def test_a_part_is_shared_only_where_it_is_the_same_rows(case, shared):
    v = unit_rows(900, seed=23)
    ids = np.arange(900, dtype=np.int64)
    older = DeviceRows([v[:400], v[400:700]], ids[:700], [450] if case == "a dead row alive" else [], "cpu", DIM)
    parts, rows, dim = [v[:400], v[400:700].copy(), v[700:]], 700, DIM
    if case == "fewer shared rows":
        rows = 699
    elif case == "other ids":
        ids = ids.copy()
        ids[[500, 501]] = ids[[501, 500]]
    elif case == "another first row":
        parts[1][0] = v[0]
    elif case == "another last row":
        parts[1][-1] = v[0]
    elif case == "other bounds":
        parts = [v[:300], v[300:700], v[700:]]
    elif case == "another dimension":
        parts, dim = [p[:, :DIM - 1].copy() for p in parts], DIM - 1
    newer = DeviceRows(parts, ids, [], "cpu", dim, reuse=(older, rows))
    assert newer.reused == shared
    assert np.array_equal(newer.host_rows(), np.concatenate(parts))
    _same_answers(newer, DeviceRows(parts, ids, [], "cpu", dim), seed=24)


def _mapped(v, sizes, use_gpu=True):
    store, at = MappedFlat(v.shape[1], use_gpu=use_gpu), 0
    for s in sizes:
        store.add(np.arange(at, at + s), v[at:at + s], stored=True)
        at += s
    return store


def test_a_deferred_copy_is_made_only_by_the_gallerys_own_thread(stand_in_device, monkeypatch):
    # (review) a request that waited for the copy (an IVF gallery's max_norm) used to make it itself: unshared,
    # unstoppable, beside the older version's
    made = []
    true_init = DeviceRows.__init__
    monkeypatch.setattr(DeviceRows, "__init__", lambda self, *a, **kw: made.append(1) or true_init(self, *a, **kw))
    store = _mapped(unit_rows(300, seed=25), [300])
    store.gpu.deferred = True
    assert store.search(unit_rows(1, seed=26), 3) is not None and not store.gpu.ready  # a request: on the CPU
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.gpu.get(store, wait=True)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not made  # it waits for the gallery's thread and makes nothing
    copy = store.gpu.get(store, wait=True, stop=threading.Event())  # the gallery's thread (it passes its stop event)
    store.gpu.release()
    waiter.join(10)
    assert not waiter.is_alive() and got == [copy] and copy is not None and made == [1]
    # released without a copy (its thread stopped, or failed first): a waiting caller makes it
    other = _mapped(unit_rows(300, seed=25), [300])
    other.gpu.deferred, got = True, []
    waiter = threading.Thread(target=lambda: got.append(other.gpu.get(other, wait=True)))
    waiter.start()
    other.gpu.release()
    waiter.join(10)
    assert got[0] is not None and got[0] is other.gpu.copy and made == [1, 1]


def test_an_ivf_request_during_a_reloads_build_waits_for_the_shared_copy(stand_in_device, tiny_lipsim, sample_folder,
                                                                         tmp_path, monkeypatch):
    # (review) its certified query asks M of the copy; it used to make the whole copy itself before the gallery's
    # thread could seed it, so nothing was shared
    import shutil
    import time

    import index.store as store_mod
    from index import update_index
    from index.gallery import Gallery
    from retrieval.serve import GalleryHolder

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    folder, index_dir, opts = _build(tmp_path, sample_folder, tiny_lipsim, "IVF2,Flat")
    holder = GalleryHolder(index_dir, encoder=tiny_lipsim, use_gpu=True)
    try:
        first = holder.current()
        first._codes_thread.join(20)
        true_seed = Gallery._seed_gpu
        monkeypatch.setattr(Gallery, "_seed_gpu", lambda self, previous: time.sleep(0.5) or true_seed(self, previous))
        shutil.copy2(sample_folder / "grass.png", folder / "grass.png")
        update_index(index_dir, encoder=tiny_lipsim, options=opts)
        new = holder.current()
        assert new.max_norm > 0  # a request's certified query, while the gallery's thread is still seeding
        new._codes_thread.join(20)
        assert new.store.gpu.copy.reused == len(first) and new.store.gpu.copy.parts[0] is first.store.gpu.copy.parts[0]
    finally:
        holder.close()


def test_a_stopped_copy_is_abandoned_between_chunks_and_can_be_made_later(stand_in_device, monkeypatch):
    import index.store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_ROWS", 50)
    v = unit_rows(300, seed=27)
    store, stop, reads = _mapped(v, [300]), threading.Event(), []

    class Stopping:  # the part's rows, setting the stop event once the first chunk was read
        def __len__(self):
            return len(v)

        def __getitem__(self, rows):
            reads.append(rows)
            stop.set()
            return v[rows]

    monkeypatch.setattr(store, "row_parts", lambda: ([Stopping()], store._ids, store._dead))
    assert store.gpu.get(store, wait=True, stop=stop) is None
    assert len(reads) == 1 and not store.gpu.ready and not store.gpu.failed
    assert store.gpu.get(store, wait=True) is not None and len(reads) == 1 + len(v) // 50


def test_a_stopped_copy_lets_go_of_the_older_copy_it_would_have_shared(stand_in_device):
    # (review) a close stops the copy, which kept holding the older version's copy (its device memory) for nothing
    v = unit_rows(300, seed=28)
    older, store = _mapped(v, [200, 100]), _mapped(v, [200, 100])
    assert older.gpu.get(older, wait=True) is not None
    store.gpu.seed(older.gpu, 200)  # (the first file shared, the second to copy)
    stop = threading.Event()
    stop.set()
    assert store.gpu.get(store, wait=True, stop=stop) is None and store.gpu._reuse is None
    assert store.gpu.get(store, wait=True).reused == 0  # (made later, in full)


def _build(tmp_path, sample_folder, tiny_lipsim, index_type="Flat"):
    from _index_fixtures import copy_photos
    from index import IngestOptions, build_index

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("astronaut", "brick", "camera", "chelsea",
                                                                    "coffee", "coins"))
    opts = IngestOptions(workers=1, use_gpu=False, merge_tiers=False)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", index_type=index_type, encoder=tiny_lipsim,
                options=opts)
    return folder, tmp_path / "index", opts


@pytest.mark.parametrize("index_type, codes", [("Flat", True), ("IVF2,Flat", True), ("Flat", False)])
def test_a_servers_reload_copies_only_the_new_files_rows_to_the_gpu(stand_in_device, tiny_lipsim, sample_folder,
                                                                     tmp_path, monkeypatch, index_type, codes):
    # before: each reload copied the whole gallery again (2.5 s at 10M on an H200) and held two full copies on the
    # device until the older version was dropped. An IVF gallery where FAISS sees no GPU: every vector on torch's
    import shutil

    import index.store as store_mod

    from index import update_index
    from index.ingest import compact_index
    from index.gallery import Gallery
    from retrieval.search import search_embedding
    from retrieval.serve import GalleryHolder

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    folder, index_dir, opts = _build(tmp_path, sample_folder, tiny_lipsim, index_type)
    holder = GalleryHolder(index_dir, encoder=tiny_lipsim, use_gpu=True, codes=codes)  # (--no-codes: the copy too)
    try:
        first = holder.current()
        first._codes_thread.join(20)
        assert first.store.factory == index_type and type(first.store).__name__ == ("MappedFlat" if index_type ==
                                                                                     "Flat" else "LayeredIVF")
        assert first.store.gpu.ready and first.quantized is None and first.store.gpu.copy.reused == 0
        base_rows = len(first)
        for step, name in enumerate(("grass", "gravel")):  # two checkpoints, each a segment of one new photo
            older = holder.current()
            shutil.copy2(sample_folder / f"{name}.png", folder / f"{name}.png")
            if step == 1:
                (folder / "brick.png").unlink()  # and a tombstone for a row of the shared base
            update_index(index_dir, encoder=tiny_lipsim, options=opts)
            new = holder.current()
            assert new is not older and new.version == older.version + 1
            new._codes_thread.join(20)
            copy, before = new.store.gpu.copy, older.store.gpu.copy
            assert copy is not None and copy.reused == base_rows + step
            assert all(a is b for a, b in zip(copy.parts, before.parts)) and len(copy.parts) == len(before.parts) + 1
            with Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=False) as on_cpu:
                ids, vecs = on_cpu.all_vectors()
                assert sorted(ids.tolist()) == sorted(new.all_vectors()[0].tolist())
                for i in range(len(ids)):
                    a, b = search_embedding(new, vecs[i], 3), search_embedding(on_cpu, vecs[i], 3)
                    assert a.method == "exhaustive" and [h.id for h in a.hits] == [h.id for h in b.hits]
                    assert np.allclose([h.radius for h in a.hits], [h.radius for h in b.hits], rtol=1e-6)
        older = holder.current()  # a compaction: one new base, nothing shared
        compact_index(index_dir)
        new = holder.current()
        new._codes_thread.join(20)
        assert new.version > older.version and new.store.gpu.copy.reused == 0
        assert not {id(p) for p in new.store.gpu.copy.parts} & {id(p) for p in older.store.gpu.copy.parts}
    finally:
        holder.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # (the builder ends cleanly)
def test_a_gallery_closed_while_its_gpu_copy_is_made_stops_it(stand_in_device, photo_index, tiny_lipsim,
                                                               monkeypatch):
    from index.gallery import Gallery

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    entered, release = threading.Event(), threading.Event()
    g = Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True)
    rows = g.store.row_parts()

    reads = []

    class Held:  # the first chunk's read waits until the gallery is closed
        def __len__(self):
            return len(rows[1])

        def __getitem__(self, sl):
            reads.append(sl)
            entered.set()
            release.wait(20)
            return np.concatenate(rows[0])[sl]

    import index.store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_ROWS", 2)
    monkeypatch.setattr(g.store, "row_parts", lambda: ([Held()], rows[1], rows[2]))
    assert g.prepare_search(background=True) is None
    thread, store = g._codes_thread, g.store
    assert entered.wait(20)
    g.close()
    release.set()
    thread.join(20)
    # the copy ended at its next chunk (before: it went on reading the mapped rows of a closed gallery)
    assert not thread.is_alive() and len(reads) == 1 and not store.gpu.ready and not store.gpu.failed
    assert g.quantized is None


def test_a_gpu_that_fails_for_good_after_opening_gives_the_gallery_its_int8_codes(stand_in_device, photo_index,
                                                                                   tiny_lipsim, monkeypatch, caplog):
    # before: the gallery had made its GPU copy instead of codes, so after the GPU failed every certified query
    # scanned the float32 vectors
    from index.gallery import Gallery
    from retrieval.search import search_embedding

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True) as g:
        assert g.prepare_search(background=True) is None
        g._codes_thread.join(20)
        assert g.store.gpu.ready and g.quantized is None
        q = g.all_vectors()[1][0]
        assert search_embedding(g, q, 3).method == "exhaustive"

        def out_of_memory(self, q, k):
            raise torch.OutOfMemoryError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(DeviceRows, "top", out_of_memory)
        with caplog.at_level(logging.WARNING):
            for _ in range(GPU_ERRORS_MAX):
                assert search_embedding(g, q, 3).hits  # each on the CPU
        assert "from now on" in caplog.text and g.store.gpu.failed
        g._codes_thread.join(20)
        assert g.quantized is not None and search_embedding(g, q, 3).method == "quantized"


def test_a_copy_that_fails_for_good_runs_its_callbacks_once(stand_in_device, monkeypatch):
    store = _mapped(unit_rows(200, seed=28), [200])
    calls = []
    store.gpu.when_failed(lambda: calls.append(1))
    store.gpu.when_failed(lambda: 1 / 0)  # a failing callback: logged, the search still answers
    assert store.on_gpu
    monkeypatch.setattr(DeviceRows, "top", lambda self, q, k: (_ for _ in ()).throw(RuntimeError("lost")))
    for _ in range(GPU_ERRORS_MAX + 2):
        assert store.search(unit_rows(1, seed=29), 2)[1].shape == (1, 2)
    assert calls == [1] and store.gpu.failed and isinstance(store.gpu, GpuCopy)


def test_a_background_build_that_fails_before_the_copy_lets_a_search_make_it(stand_in_device, photo_index,
                                                                             tiny_lipsim, monkeypatch, caplog):
    # a deferred copy is made only by the gallery's own thread: if that thread fails first, searches must not stay
    # on the CPU for good
    from index.gallery import Gallery

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    monkeypatch.setattr(Gallery, "_seed_gpu", lambda self, previous: 1 / 0)
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True) as g:
        with caplog.at_level(logging.WARNING):
            g.prepare_search(background=True)
            g._codes_thread.join(20)
        assert "division by zero" in caplog.text and not g.store.gpu.ready and not g.store.gpu.deferred
        g.store.search(g.all_vectors()[1][:1], 2)
        assert g.store.gpu.ready


def test_an_uncertified_query_on_an_ivf_gallery_whose_gpu_copy_is_being_made_is_still_exact(
        stand_in_device, tiny_lipsim, sample_folder, tmp_path, monkeypatch):
    # before: while the copy was made, such a query ran on the index's nprobe lists on the CPU, unflagged (on the GPU
    # and with certified lists it is exact, or says it is not)
    import index.store as store_mod
    from index.gallery import Gallery
    from retrieval.search import search_embedding

    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    _, index_dir, _ = _build(tmp_path, sample_folder, tiny_lipsim, "IVF2,Flat")
    with Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=True) as g, \
            Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=False) as cpu:
        assert g.store.params["nprobe"] == 1 and g.certified_ivf is None
        g.store.gpu.deferred = True  # (the copy not made yet: every search on the CPU)
        ids, vecs = cpu.all_vectors()
        for i in range(len(ids)):
            got = search_embedding(g, vecs[i], len(ids), certify=False)
            assert not g.store.gpu.ready and len(got.hits) == len(ids)
            want = vecs.astype(np.float64) @ vecs[i].astype(np.float64)
            assert [h.id for h in got.hits] == [int(ids[j]) for j in np.argsort(-want, kind="stable")]


def test_a_gallery_without_a_lipschitz_bound_makes_its_gpu_copy_in_the_background(stand_in_device, photo_index,
                                                                                   tiny_lipsim, monkeypatch):
    # (DreamSim's galleries: no codes, but the copy is made off the requests' threads all the same)
    from index.gallery import Gallery

    monkeypatch.setattr(Gallery, "lipschitz", property(lambda self: None))
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True) as g:
        assert g.prepare_search(background=True) is None and g.store.gpu.deferred
        g._codes_thread.join(20)
        assert g.store.gpu.ready and g.quantized is None
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=False) as g:
        assert g.prepare_search(background=True) is None and g._codes_thread is None  # (nothing to build on the CPU)


def _reloads(holder, rng, folder, sample_folder, index_dir, opts, tiny_lipsim, steps: int = 5):
    """A random history (photos added, removed, changed and renamed; checkpoints with and without merging;
    compactions; versions the server skips) under `holder`: yields (previous, current) at each reload it opens,
    once the current version's background build is done; at least one."""
    import os
    import shutil

    from index import update_index
    from index.ingest import compact_index
    from PIL import Image

    names = sorted(p.name for p in sample_folder.glob("*.png"))
    prev, seen = holder.current(), 0
    for step in range(steps):
        present = sorted(os.listdir(folder))
        op = rng.random()
        if op < 0.35:
            for n in rng.sample([x for x in names if x not in present] or names, 2):
                shutil.copy2(sample_folder / n, folder / n)
        elif op < 0.55 and len(present) > 2:
            (folder / rng.choice(present)).unlink()
        elif op < 0.7:
            with Image.open(folder / rng.choice(present)) as im:
                changed = im.rotate(90)
            changed.save(folder / present[0])
        elif op < 0.8:
            name = rng.choice(present)
            (folder / name).rename(folder / f"r{step}{name}")
        if op < 0.9:
            update_index(index_dir, encoder=tiny_lipsim, options=opts)
        else:
            compact_index(index_dir)
        if step % 2 and rng.random() < 0.5:
            continue  # a version the server never opens
        g = holder.current()
        if g is prev:
            continue
        g._codes_thread.join(60)
        yield prev, g
        prev, seen = g, seen + 1
    assert seen


def _shared_rows(prev, g) -> int:
    from index.layout import common_files, file_starts, live_files

    common = common_files(live_files(prev.meta["index"]), live_files(g.meta["index"]))
    return file_starts(live_files(g.meta["index"]))[common]


def _answers_as(g, cpu, seed, method: str | None = None) -> None:
    """Every item of `cpu` (the same version, exact scan), moved a little, searched on g and cpu: the same scores,
    the same ids (equal scores may come in another order), the same radii."""
    from retrieval.search import search_embedding

    ids, vecs = cpu.all_vectors()
    assert g.max_norm >= np.linalg.norm(vecs.astype(np.float64), axis=1).max()
    exact = dict(zip(ids.tolist(), vecs.astype(np.float64)))
    for i in range(len(ids)):
        q = vecs[i] + np.float32(0.05) * unit_rows(1, seed=seed + i, dim=vecs.shape[1])[0]
        q /= np.linalg.norm(q)
        a, b = search_embedding(g, q, 3), search_embedding(cpu, q, 3)
        assert method is None or a.method == method
        score = [[round(float(exact[h.id] @ q), 12) for h in r.hits] for r in (a, b)]
        every = [round(float(v @ q), 12) for v in exact.values()]
        assert score[0] == score[1]  # (and the same ids, but where two items score exactly alike: any order)
        assert all(x.id == y.id or every.count(s) > 1 for x, y, s in zip(a.hits, b.hits, score[0]))
        assert np.allclose([h.radius for h in a.hits], [h.radius for h in b.hits], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_of_checkpoints_reload_onto_shared_copies_that_answer_as_the_cpu(
        stand_in_device, tiny_lipsim, sample_folder, tmp_path, monkeypatch, seed):
    # at each reload of a random history the copy shares exactly the rows of the files both versions hold, equals a
    # copy made in full, and every search and certificate is the CPU's (equal scores may come in another order)
    import random

    import index.store as store_mod
    from index.gallery import Gallery
    from retrieval.serve import GalleryHolder

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    rng = random.Random(seed)
    folder, index_dir, opts = _build(tmp_path, sample_folder, tiny_lipsim, rng.choice(["Flat", "IVF2,Flat"]))
    opts.merge_tiers = rng.random() < 0.5
    holder = GalleryHolder(index_dir, encoder=tiny_lipsim, use_gpu=True, codes=rng.random() < 0.7)
    try:
        for prev, g in _reloads(holder, rng, folder, sample_folder, index_dir, opts, tiny_lipsim):
            copy, older = g.store.gpu.copy, prev.store.gpu.copy
            assert copy.reused == _shared_rows(prev, g)
            assert copy.reused == sum(len(p) for p in copy.parts if any(p is x for x in older.parts))
            with Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=True) as fresh, \
                    Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=False) as cpu:
                assert fresh.store.on_gpu
                full = fresh.store.gpu.copy
                assert np.array_equal(copy.host_rows(), full.host_rows()) and np.array_equal(copy.ids, full.ids)
                assert np.array_equal(copy.dead_rows, full.dead_rows)
                assert sorted(copy.ids[copy.alive_rows()].tolist()) == sorted(cpu.ids().tolist())
                _answers_as(g, cpu, seed)
    finally:
        holder.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_of_checkpoints_reload_onto_shared_codes_that_answer_as_the_exact_scan(
        tiny_lipsim, sample_folder, tmp_path, monkeypatch, seed):
    # the int8 codes (no GPU): at each reload they share exactly the parts of the files both versions hold (the
    # same arrays), equal codes made in full bit for bit, and every certified search is the exact scan's
    import random

    import index.store as store_mod
    from index.codes import QuantizedCodes
    from index.gallery import Gallery
    from retrieval.serve import GalleryHolder
    from test_quantized_search import _same_codes

    monkeypatch.setattr(gallery_mod, "QUANTIZED_MIN", 1)
    monkeypatch.setattr(store_mod, "IVF_MIN_POINTS_PER_LIST", 1)
    rng = random.Random(100 + seed)
    folder, index_dir, opts = _build(tmp_path, sample_folder, tiny_lipsim, rng.choice(["Flat", "IVF2,Flat"]))
    opts.merge_tiers = rng.random() < 0.5
    holder = GalleryHolder(index_dir, encoder=tiny_lipsim, use_gpu=False)
    try:
        for prev, g in _reloads(holder, rng, folder, sample_folder, index_dir, opts, tiny_lipsim):
            codes, older = g.quantized, prev.quantized
            assert codes.reused == _shared_rows(prev, g)
            held = [p for p, (a, b) in enumerate(zip(codes.parts, older.parts)) if a.codes is b.codes]
            assert sum(codes.layout.starts[p + 1] - codes.layout.starts[p] for p in held) == codes.reused
            with Gallery.open(index_dir, encoder=tiny_lipsim, use_gpu=False) as cpu:
                _same_codes(codes, QuantizedCodes.from_store(cpu.store))
                assert cpu.quantized is None  # (no codes: its certified searches scan the float32 vectors)
                _answers_as(g, cpu, seed, method="quantized")
    finally:
        holder.close()


def test_a_copy_of_several_parts_scores_half_a_tile_of_queries_at_once(monkeypatch):
    # (review) each part's block of scores and their concatenation are held at once: 2 × TILE_SCORES before
    v = unit_rows(400, seed=30)
    monkeypatch.setattr(gpu_scan, "TILE_SCORES", 400 * 8)  # 8 queries a product over one part
    shapes = []
    true_scores = DeviceRows._scores
    monkeypatch.setattr(DeviceRows, "_scores", lambda self, part: shapes.append(len(part)) or true_scores(self, part))
    q = unit_rows(20, seed=31)
    one, two = DeviceRows([v], np.arange(400), [], "cpu", DIM), DeviceRows([v[:150], v[150:]], np.arange(400), [],
                                                                            "cpu", DIM)
    a = one.top(q, 5)
    assert shapes == [8, 8, 4]
    shapes.clear()
    b = two.top(q, 5)
    assert shapes == [4] * 5 and np.array_equal(a[1], b[1])


def test_without_a_gpu_a_mapped_store_holds_no_copy_and_asks_for_no_build(photo_index, tiny_lipsim, monkeypatch):
    # (before: a GpuCopy on every CPU machine, so `prepare_search(background=True)` started a thread that only found
    # no GPU)
    from index.gallery import Gallery

    monkeypatch.setattr(gpu_scan, "scan_device", lambda: None)
    monkeypatch.setattr(Gallery, "lipschitz", property(lambda self: None))
    with Gallery.open(photo_index[1], encoder=tiny_lipsim, use_gpu=True) as g:
        assert g.store.gpu is None and g.prepare_search(background=True) is None and g._codes_thread is None
