"""Trusting an index: tampering, hostile file types, files swapped after the scan, secrets, bad input.

Each test reproduces one way robret used to answer wrongly with full confidence, hang or leak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from index import (Catalog, Gallery, IngestOptions, IntegrityError, VectorStore, build_index,
                   repair_index, update_index, verify_index)
from index.layout import IndexDir
from retrieval.cli import main as robret
from _index_fixtures import copy_photos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = IngestOptions(workers=1, batch_size=4)
NAMES = ("coffee", "coins", "camera", "moon", "rocket")


@pytest.fixture()
def built(tmp_path, sample_folder, tiny_lipsim):
    folder = copy_photos(sample_folder, tmp_path / "photos", names=NAMES)
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    return folder, index_dir


def _index_meta(index_dir) -> dict:
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    try:
        return catalog.meta()["index"]
    finally:
        catalog.close()


def _ids_by_name(index_dir) -> dict[str, int]:
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    try:
        return {r.path: r.id for r in catalog.find()}
    finally:
        catalog.close()


def _swap_two_vectors(index_dir, a: int, b: int) -> None:
    """Tamper as an attacker would: same ids, same row count, two vectors exchanged (in the live base file,
    which holds both when they were indexed by the build)."""
    from index.layout import live_files

    meta = _index_meta(index_dir)
    live = IndexDir(index_dir).path / live_files(meta)[0]["name"]
    store = VectorStore.read(live, meta["factory"], use_gpu=False)
    va, vb = store.reconstruct([a]), store.reconstruct([b])
    store.remove([a, b])
    store.add([a, b], np.concatenate([vb, va]))
    store.write(live)


def _robret_subprocess(args, timeout, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "retrieval.cli", *args], env=env, cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


# 1. tampered index file --------------------------------------------------------------------------------
def test_swapped_vectors_are_refused_at_open_query_and_update_until_repair(built, tiny_lipsim, capsys):
    folder, index_dir = built
    ids = _ids_by_name(index_dir)
    _swap_two_vectors(index_dir, ids["coffee.png"], ids["moon.png"])
    version = _index_meta(index_dir)["version"]
    with pytest.raises(IntegrityError, match="robret index repair"):
        Gallery.open(index_dir, encoder=tiny_lipsim)
    # The command line says so and answers nothing (it used to print moon.png at rank 1, score 1.0).
    code = robret(["query", str(folder / "coffee.png"), "--index-dir", str(index_dir), "--cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and "robret index repair" in err and "moon.png" not in out
    # update refuses to build on it (it used to write a fresh checksum over the swapped vectors)
    with pytest.raises(IntegrityError, match="robret index repair"):
        update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert _index_meta(index_dir)["version"] == version
    assert any(p.startswith("checksum") for p in verify_index(index_dir).problems)
    # repair rebuilds from the files: coffee finds coffee again
    repair_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert verify_index(index_dir).ok
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        q = g.embed_images([g.decode(folder / "coffee.png").image])
        scores, found = g.search(q, k=1)
    assert g.paths(found[0])[0].name == "coffee.png" and scores[0, 0] > 0.999


def test_a_flipped_byte_in_the_index_file_is_refused(built, tiny_lipsim):
    _, index_dir = built
    live = IndexDir(index_dir).index_file(_index_meta(index_dir)["version"])
    data = bytearray(live.read_bytes())
    data[-5] ^= 0x01  # inside the last stored vector: still a loadable FAISS file
    live.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        Gallery.open(index_dir)


# 2. FIFOs and other non-regular files -----------------------------------------------------------------
def _guarded(fn, fifo, seconds=30.0):
    """Run fn() in a thread; if it is still blocked after `seconds`, unblock it (open the FIFO's writing
    end, then close it: the reader sees end of file) and fail the test."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(10)
        pytest.fail(f"blocked for {seconds:.0f} s on the FIFO {fifo}")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_read_bytes_refuses_a_fifo_without_blocking(tmp_path):
    from index.decode import DecodeError, read_bytes

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError) as err:
        _guarded(lambda: read_bytes(fifo, 1 << 20), fifo)
    assert err.value.kind == "not_regular"


def test_file_swapped_for_a_fifo_after_the_scan_fails_that_file_only(built, tiny_lipsim, monkeypatch):
    import index.ingest as ingest

    folder, index_dir = built
    target = folder / "coins.png"
    real_scan = ingest.scan_source

    def scan_then_swap(*args, **kwargs):
        result = real_scan(*args, **kwargs)  # the scan saw a regular file …
        os.remove(target)  # … which becomes a FIFO before it is read
        os.mkfifo(target)
        return result

    os.utime(folder / "coins.png", ns=(1, 1))  # changed stat: the update must read it
    monkeypatch.setattr(ingest, "scan_source", scan_then_swap)
    report = _guarded(lambda: update_index(index_dir, encoder=tiny_lipsim, options=OPTS), target)
    assert [(p, r.split(":")[0]) for p, r in report.failed] == [("coins.png", "not_regular")]
    assert verify_index(index_dir).ok


def test_query_of_a_fifo_exits_with_a_message_instead_of_hanging(built, tmp_path):
    _, index_dir = built
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    try:
        done = _robret_subprocess(["query", str(fifo), "--index-dir", str(index_dir), "--cpu"], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("robret query on a FIFO did not return")
    assert done.returncode == 1 and "not a regular file" in done.stderr and "Traceback" not in done.stderr


# 3. files outside the gallery (symlinks swapped in after the scan) ------------------------------------
def _secret(tmp_path, sample_folder):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes((sample_folder / "astronaut.png").read_bytes())
    return secret


def test_symlink_swapped_in_after_the_scan_is_not_indexed(built, tiny_lipsim, tmp_path, sample_folder,
                                                          monkeypatch):
    import index.ingest as ingest

    folder, index_dir = built
    secret = _secret(tmp_path, sample_folder)
    target = folder / "coins.png"
    real_scan = ingest.scan_source

    def scan_then_swap(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        os.remove(target)
        os.symlink(secret, target)
        return result

    os.utime(target, ns=(1, 1))
    monkeypatch.setattr(ingest, "scan_source", scan_then_swap)
    report = update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert [(p, r.split(":")[0]) for p, r in report.failed] == [("coins.png", "symlink_escape")]
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        q = g.embed_images([g.decode(secret).image])
        scores, _ = g.search(q, k=1)
    assert scores[0, 0] < 0.999  # the outside file's content never entered the index


def test_gallery_image_refuses_an_escaping_symlink_and_a_changed_file(built, tmp_path, sample_folder):
    from index import DecodeError

    folder, index_dir = built
    ids = _ids_by_name(index_dir)
    secret = _secret(tmp_path, sample_folder)
    with Gallery.open(index_dir) as g:
        assert g.image(ids["moon.png"]).size == g.decode(folder / "moon.png").image.size
        os.remove(folder / "coffee.png")
        os.symlink(secret, folder / "coffee.png")
        with pytest.raises(DecodeError) as err:
            g.image(ids["coffee.png"])
        assert err.value.kind == "symlink_escape"
        (folder / "coins.png").write_bytes((folder / "camera.png").read_bytes())
        with pytest.raises(DecodeError, match="changed since indexed") as err:
            g.image(ids["coins.png"])
        assert err.value.kind == "changed"


def test_ui_shows_changed_since_indexed_instead_of_the_file(built, tmp_path, sample_folder):
    from PIL import Image
    import io

    from index import DecodeError
    from ui.config import UIConfig
    from ui.engine import Engine

    folder, index_dir = built
    ids = _ids_by_name(index_dir)
    engine = Engine(UIConfig(index_dir=str(index_dir), compare="pixels:16", cache_dir=str(tmp_path / "cache")))
    good = Image.open(io.BytesIO(engine.thumbnail(ids["moon.png"])))
    secret = _secret(tmp_path, sample_folder)
    os.remove(folder / "coffee.png")
    os.symlink(secret, folder / "coffee.png")
    (folder / "coins.png").write_bytes((folder / "camera.png").read_bytes())
    for name in ("coffee.png", "coins.png"):
        with pytest.raises(DecodeError):
            engine.image(ids[name])  # a query picked from the gallery: refused, with the reason
    changed = np.asarray(Image.open(io.BytesIO(engine.thumbnail(ids["coins.png"]))).convert("L"), float)
    escaped = np.asarray(Image.open(io.BytesIO(engine.thumbnail(ids["coffee.png"]))).convert("L"), float)
    blank = np.asarray(Image.open(io.BytesIO(engine.thumbnail(-5))).convert("L"), float)
    assert good.size == (160, 160) or max(good.size) == 160
    # placeholders (grey, with their label drawn), never the pixels of the file now at that path
    for img in (changed, escaped):
        assert img.shape == blank.shape and np.median(img) == pytest.approx(np.median(blank), abs=3)
        assert np.abs(img - blank).max() > 50  # the label
    assert np.abs(changed - escaped).max() > 50  # different labels


# 6. read-only index (a shared gallery on read-only media) ---------------------------------------------
@pytest.fixture()
def read_only():
    """read_only(path): a context manager making `path` read-only for this process — chmod for a normal
    user; for root (who writes through chmod) a read-only bind mount; skipped where neither works."""
    import contextlib
    import stat

    @contextlib.contextmanager
    def make(path):
        path = str(path)
        if os.geteuid() != 0:
            modes = {}
            for dirpath, _dirs, files in os.walk(path):
                for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                    modes[p] = os.lstat(p).st_mode
                    os.chmod(p, modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            try:
                yield
            finally:
                for p, mode in modes.items():
                    os.chmod(p, mode)
            return
        bind = subprocess.run(["mount", "--bind", path, path], capture_output=True)
        if bind.returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        try:
            ro = subprocess.run(["mount", "-o", "remount,ro,bind", path], capture_output=True)
            if ro.returncode != 0:
                pytest.skip("cannot make a read-only mount here")
            with pytest.raises(OSError):
                open(os.path.join(path, "probe"), "w")
            yield
        finally:
            subprocess.run(["umount", path], check=True)

    return make


def test_read_only_index_answers_queries_and_verifies(tmp_path, sample_folder, tiny_lipsim, read_only, capsys):
    share = tmp_path / "share"
    folder = copy_photos(sample_folder, share / "photos", names=NAMES)
    index_dir = share / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, options=OPTS)
    import gc

    gc.collect()  # as after the build process exits: SQLite's -wal/-shm files go with its last connection
    before = sorted(os.listdir(index_dir))
    assert "catalog.sqlite-shm" not in before
    with read_only(share):
        with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
            q = g.embed_images([g.decode(folder / "moon.png").image])
            _, found = g.search(q, k=1)
            assert g.paths(found[0])[0].name == "moon.png"
        report = verify_index(index_dir)
        assert report.ok, report.problems
        assert robret(["query", str(folder / "moon.png"), "--index-dir", str(index_dir), "--cpu", "-k", "2"]) == 0
        assert robret(["index", "verify", str(index_dir)]) == 0
        assert robret(["index", "stats", str(index_dir)]) == 0
        out, err = capsys.readouterr()
        assert "moon.png" in out and "OK" in out and "repair" not in out + err
    assert sorted(os.listdir(index_dir)) == before


def test_verify_does_not_advise_repair_when_the_catalog_cannot_be_read(built, capsys):
    _, index_dir = built
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    catalog.set_meta({"schema_version": 99})
    catalog.close()
    assert robret(["index", "verify", str(index_dir)]) == 1
    out, _ = capsys.readouterr()
    assert "upgrade robret" in out and "repair" not in out


# 7. messages, not tracebacks ---------------------------------------------------------------------------
@pytest.mark.parametrize("url, says", [
    ("nosuchdb://user@localhost/x", "nosuchdb"),
    ("postgresql+nosuchdriver://user@localhost/x", "nosuchdriver"),
    ("postgresql://user@localhost/x", "robret[postgres]"),
])
def test_unusable_db_url_is_a_message_and_writes_nothing(tmp_path, sample_folder, url, says, capsys,
                                                        monkeypatch):
    if "postgresql://" in url:  # where psycopg is installed, make it unimportable as on a bare install
        monkeypatch.setitem(sys.modules, "psycopg", None)
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon",))
    index_dir = tmp_path / "index"
    code = robret(["index", "build", str(folder), "--index-dir", str(index_dir), "--db", url,
                   "--encoder", "lipsim:cpu-tiny", "--cpu", "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 1 and says in err and "Traceback" not in err
    assert not (index_dir / "robret-index.json").exists()


def test_config_without_encoder_is_a_message(built, capsys):
    _, index_dir = built
    config_path = IndexDir(index_dir).config_path
    config = json.loads(config_path.read_text())
    del config["encoder"]
    config_path.write_text(json.dumps(config))
    assert robret(["index", "update", str(index_dir), "--cpu", "--no-progress"]) == 1
    _, err = capsys.readouterr()
    assert "encoder" in err and "robret-index.json" in err


@pytest.mark.parametrize("key", ["encoder", "index", "root"])
def test_catalog_metadata_with_a_missing_key_is_a_message(built, key, capsys):
    from index.catalog import meta_table
    from sqlalchemy import delete

    folder, index_dir = built
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    with catalog.engine.begin() as c:
        c.execute(delete(meta_table).where(meta_table.c.key == key))
    catalog.close()
    for args in (["query", str(folder / "moon.png"), "--index-dir", str(index_dir), "--cpu"],
                 ["index", "verify", str(index_dir)], ["index", "stats", str(index_dir)]):
        code = robret(args)
        out, err = capsys.readouterr()
        assert code == 1 and repr(key) in out + err, args


def test_json_piped_into_a_closed_pipe_exits_quietly(built):
    _, index_dir = built
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "index", "stats", str(index_dir), "--json"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err and code == 141


# 9. a relative checkpoint path --------------------------------------------------------------------------
def test_relative_encoder_checkpoint_is_recorded_absolute(tmp_path, sample_folder, tiny_lipsim, monkeypatch,
                                                          capsys):
    from encoder.checkpoint import save_lipsim

    work = tmp_path / "work"
    work.mkdir()
    save_lipsim(tiny_lipsim, work / "mine.safetensors", preset="cpu-tiny")
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins", "camera"))
    monkeypatch.chdir(work)
    assert robret(["index", "build", str(folder), "--index-dir", str(tmp_path / "index"),
                   "--encoder", "lipsim:mine.safetensors", "--cpu", "--no-progress"]) == 0
    config = json.loads((tmp_path / "index" / "robret-index.json").read_text())
    assert config["encoder"] == f"lipsim:{work / 'mine.safetensors'}"
    monkeypatch.chdir(tmp_path)  # elsewhere: update and query still find the weights
    assert robret(["index", "update", str(tmp_path / "index"), "--cpu", "--no-progress"]) == 0
    assert robret(["query", str(folder / "moon.png"), "--index-dir", str(tmp_path / "index"), "--cpu",
                   "-k", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "moon.png" in out


# 10. input validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["-k", "0"], "at least 1"), (["-k", "-3"], "at least 1"), (["--certify-eps", "-1"], "≥ 0"),
    (["--certify-eps", "nan"], "≥ 0"), (["--candidates", "-1"], "at least 1"),
])
def test_bad_query_arguments_exit_2_with_a_message(tmp_path, args, says, capsys):
    with pytest.raises(SystemExit) as exited:
        robret(["query", "q.png", "--index-dir", str(tmp_path), *args])
    assert exited.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_max_pixels_exits_2_before_anything_is_written(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exited:
        robret(["index", "build", str(tmp_path), "--index-dir", str(tmp_path / "index"), "--max-pixels", value])
    assert exited.value.code == 2 and "--max-pixels" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


def test_max_pixels_given_is_the_limit_recorded(tmp_path, sample_folder, tiny_lipsim):
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins"))
    assert robret(["index", "build", str(folder), "--index-dir", str(tmp_path / "index"), "--encoder",
                   "lipsim:cpu-tiny", "--cpu", "--no-progress", "--max-pixels", "1000"]) == 0
    catalog = Catalog.open(IndexDir(tmp_path / "index").catalog_url())
    assert catalog.meta()["limits"]["max_pixels"] == 1000
    assert {r.reason.split(":")[0] for r in catalog.find()} == {"too_many_pixels"}
    catalog.close()


# 5. credentials ----------------------------------------------------------------------------------------
def _files_containing(root, needle: bytes) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                if needle in f.read():
                    found.append(path)
    return found


def test_a_password_in_db_url_is_never_written_or_printed(tmp_path, sample_folder, capsys):
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon",))
    url = "postgresql://robret:s3cret-pw@127.0.0.1:1/gallery"  # nothing listens on port 1
    code = robret(["index", "build", str(folder), "--index-dir", str(tmp_path / "index"), "--db", url,
                   "--encoder", "lipsim:cpu-tiny", "--cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and "s3cret-pw" not in out + err and "***" in err
    assert _files_containing(tmp_path, b"s3cret-pw") == []


def test_recorded_catalog_url_has_no_password_and_the_environment_supplies_it(tmp_path, monkeypatch):
    from index.catalog import DB_URL_ENV, recorded_url

    url = "postgresql://robret:s3cret-pw@db.example:5432/gallery"
    assert recorded_url(url) == "postgresql://robret@db.example:5432/gallery"
    layout = IndexDir(tmp_path / "index")
    layout.write_config(recorded_url(url), str(tmp_path), "lipsim:cpu-tiny", "auto")
    assert b"s3cret" not in layout.config_path.read_bytes()
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    assert layout.catalog_url() == "postgresql://robret@db.example:5432/gallery"  # libpq: PGPASSWORD, .pgpass
    monkeypatch.setenv(DB_URL_ENV, url)
    assert layout.catalog_url() == url
    monkeypatch.setenv(DB_URL_ENV, "postgresql://robret:other@db.example:5432/another")
    assert layout.catalog_url() == "postgresql://robret@db.example:5432/gallery"  # another database: not used


def test_db_url_from_the_environment_is_used_and_recorded(tmp_path, sample_folder, monkeypatch):
    from index.catalog import DB_URL_ENV

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins"))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv(DB_URL_ENV, url)
    assert robret(["index", "build", str(folder), "--index-dir", str(tmp_path / "index"),
                   "--encoder", "lipsim:cpu-tiny", "--cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "index" / "robret-index.json").read_text())["catalog"] == url
    assert (tmp_path / "shared.db").is_file() and verify_index(tmp_path / "index").ok


# 4. two index directories, one catalog -----------------------------------------------------------------
def test_a_second_index_on_the_same_catalog_is_refused_and_the_first_stays_intact(tmp_path, sample_folder,
                                                                                  tiny_lipsim):
    from index import CatalogError

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins", "camera"))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = tmp_path / "a", tmp_path / "b"
    build_index(folder, a, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=url, options=OPTS)
    version = _index_meta(a)["version"]
    with pytest.raises(CatalogError, match="already belongs to an index"):
        build_index(folder, b, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=url, options=OPTS)
    # B's directory made to point at A's catalog (a copied configuration): every use of it is refused
    b.mkdir(exist_ok=True)
    IndexDir(b).write_config(url, str(folder), "lipsim:cpu-tiny", "auto", owner="someone-else")
    for use in (lambda: repair_index(b, encoder=tiny_lipsim, options=OPTS),
                lambda: update_index(b, encoder=tiny_lipsim, options=OPTS), lambda: Gallery.open(b)):
        with pytest.raises(CatalogError, match="belongs to another index"):
            use()
    assert not verify_index(b).ok
    assert verify_index(a).ok and _index_meta(a)["version"] == version
    with Gallery.open(a) as g:
        assert len(g) == 3


# verify without decoding the index file: checksum + the committed ids' digest --------------------------------
def test_the_recorded_ids_digest_is_the_sha256_of_the_files_ascending_ids(built):
    import hashlib

    from index.catalog import ids_digest

    _, index_dir = built
    meta = _index_meta(index_dir)
    store = VectorStore.read(IndexDir(index_dir).index_file(meta["version"]), meta["factory"])
    ids = np.sort(store.ids())
    independent = hashlib.sha256(b"".join(int(i).to_bytes(8, "little", signed=True) for i in ids)).hexdigest()
    assert meta["ids_sha256"] == independent == ids_digest([int(i) for i in ids]) == ids_digest(ids)
    assert ids_digest([1, 2]) != ids_digest([1, 3]) and ids_digest([]) == hashlib.sha256(b"").hexdigest()


def test_default_verify_catches_catalog_rows_that_no_longer_match_the_file_without_decoding_it(built):
    """Counts unchanged, checksum unchanged: one indexed row's id is rewritten in the catalog. The default
    verify (no FAISS) reports it from the ids digest; --deep reports it from the file's ids."""
    from sqlalchemy import update

    from index.catalog import files_table

    _, index_dir = built
    report = verify_index(index_dir)
    assert report.ok and report.facts["checks"] == "checksum+ids"
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    victim = int(catalog.indexed_id_list()[0])
    with catalog.engine.begin() as c:
        c.execute(update(files_table).where(files_table.c.id == victim).values(id=victim + 10_000))
    catalog.close()
    report = verify_index(index_dir)
    assert not report.ok and report.facts["checks"] == "checksum+ids"
    assert [p.split(":")[0] for p in report.problems] == ["ids"]
    deep = verify_index(index_dir, deep=True)
    assert any("orphans" in p for p in deep.problems) and any("lost" in p for p in deep.problems)
    code = robret(["index", "verify", "--index-dir", str(index_dir)])
    assert code == 1


def test_versions_written_without_an_ids_digest_are_verified_by_decoding_the_file(built):
    _, index_dir = built
    catalog = Catalog.open(IndexDir(index_dir).catalog_url())
    index_meta = catalog.meta()["index"]
    del index_meta["ids_sha256"]
    catalog.set_meta({"index": index_meta})
    catalog.close()
    report = verify_index(index_dir)
    assert report.ok and report.facts["checks"] == "deep" and report.facts["ntotal"] == len(NAMES)


# 8. verify while a writer commits -------------------------------------------------------------------------
def verify_with_a_commit_midway(folder, index_dir, encoder, monkeypatch):
    """verify_index while a writer commits between verify's read of the committed version and its
    read of the rows (that update removes a row: a new version, the old file deleted)."""
    os.remove(folder / "rocket.png")
    real = Catalog.indexed_id_list
    calls = []

    def writer_commits_first(self):
        if not calls:
            update_index(index_dir, encoder=encoder, options=OPTS)
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Catalog, "indexed_id_list", writer_commits_first)
    return verify_index(index_dir)


def test_verify_reads_a_consistent_version_when_a_writer_commits_midway(built, tiny_lipsim, monkeypatch):
    folder, index_dir = built
    version = _index_meta(index_dir)["version"]
    report = verify_with_a_commit_midway(folder, index_dir, tiny_lipsim, monkeypatch)
    assert report.ok, report.problems
    assert report.facts["version"] == version + 1 and report.facts["indexed_rows"] == len(NAMES) - 1


def test_verify_during_a_stream_of_updates_never_reports_a_false_inconsistency(built, tiny_lipsim):
    import threading

    folder, index_dir = built
    stop = threading.Event()
    errors: list = []

    def writer():
        names = sorted(p.name for p in folder.iterdir())
        n = 0
        while not stop.is_set():
            path = folder / names[n % len(names)]
            data = path.read_bytes()
            os.remove(path)
            try:
                update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
                path.write_bytes(data)
                update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
            except Exception as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
                return
            n += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        versions, checks, deadline = set(), 0, time.monotonic() + 180
        # At least 40 checks, and on until verify has seen the writer commit several versions (verify is
        # quicker than an update: a fixed count of checks could all fall between two commits).
        while (checks < 40 or len(versions) <= 4) and time.monotonic() < deadline and not errors:
            report = verify_index(index_dir)
            assert report.ok, report.problems
            versions.add(report.facts["version"])
            checks += 1
    finally:
        stop.set()
        t.join(60)
    assert not errors and len(versions) > 3  # the writer really committed meanwhile


# 12. smaller ---------------------------------------------------------------------------------------------
def test_a_directory_that_cannot_be_listed_is_recorded_in_stats(built, tiny_lipsim, monkeypatch, capsys):
    import errno

    import index.scan as scan

    folder, index_dir = built
    locked = folder / "locked"
    locked.mkdir()
    (locked / "inside.png").write_bytes((folder / "moon.png").read_bytes())
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    if os.geteuid() == 0:  # root lists chmod-000 directories: inject the error scandir gives others
        real = os.scandir

        def deny(path):
            if os.fsencode(path).endswith(b"/locked"):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(scan.os, "scandir", deny)
    else:
        locked.chmod(0)
    try:
        report = update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    finally:
        locked.chmod(0o755)
    assert report.unlisted == ["locked"] and report.removed == 0
    assert robret(["index", "stats", str(index_dir)]) == 0
    out, _ = capsys.readouterr()
    assert "could not be listed" in out and "locked" in out


def test_a_failure_whose_reason_names_a_process_id_does_not_bump_the_version(built, tiny_lipsim):
    folder, index_dir = built
    import threading

    # resolves to /proc/<pid>/task/<tid>/…: another id for every process (here: every thread) that looks
    os.symlink("/proc/thread-self/comm", folder / "proc.png")

    def update_in_a_new_thread():
        box = []
        t = threading.Thread(target=lambda: box.append(update_index(index_dir, encoder=tiny_lipsim, options=OPTS)))
        t.start()
        t.join()
        return box[0]

    first = update_in_a_new_thread()
    assert [r.split(":")[0] for _, r in first.failed] == ["symlink_escape"]
    again = update_in_a_new_thread()
    assert again.index_version == first.index_version and again.still_failed == 1
