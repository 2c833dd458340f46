"""The catalog on SQLite and on a real PostgreSQL server (started by tests/_postgres_fixtures.py):
build, update, verify, tampering, ownership, credentials and SIGKILLs at each commit point."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from index import (CatalogError, Gallery, IngestOptions, IntegrityError, build_index, repair_index, update_index,
                   verify_index)
from index.catalog import DB_URL_ENV
from retrieval.cli import main as robret
from _index_fixtures import copy_photos
from _postgres_fixtures import PASSWORD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = IngestOptions(workers=1, batch_size=3)
NAMES = ("coffee", "coins", "camera", "moon", "rocket")


@pytest.fixture(params=["sqlite", "postgresql"])
def new_catalog(request, tmp_path, monkeypatch):
    """new_catalog() → the URL of an empty catalog database on this parameter's backend."""
    if request.param == "sqlite":
        count = iter(range(100))
        return lambda: f"sqlite:///{tmp_path / f'catalog-{next(count)}.db'}"
    server = request.getfixturevalue("postgres_server")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    return lambda: server.url(server.create_database())


def _ids(index_dir) -> dict[str, int]:
    with Gallery.open(index_dir) as g:
        return {r.path: r.id for r in g.catalog.find()}


def test_build_search_update_tamper_repair_on_each_catalog(tmp_path, sample_folder, tiny_lipsim, new_catalog):
    from test_index_trust import _swap_two_vectors

    folder = copy_photos(sample_folder, tmp_path / "photos", names=NAMES)
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        q = g.embed_images([g.decode(folder / "moon.png").image])
        scores, found = g.search(q, k=1)
        assert g.paths(found[0])[0].name == "moon.png" and scores[0, 0] > 0.999
    os.remove(folder / "rocket.png")
    assert update_index(index_dir, encoder=tiny_lipsim, options=OPTS).removed == 1
    assert verify_index(index_dir).ok
    ids = _ids(index_dir)
    _swap_two_vectors(index_dir, ids["coffee.png"], ids["moon.png"])
    with pytest.raises(IntegrityError, match="repair"):
        Gallery.open(index_dir)
    with pytest.raises(IntegrityError):
        update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    repair_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    assert verify_index(index_dir).ok


def test_two_indexes_share_a_server_not_a_catalog(tmp_path, sample_folder, tiny_lipsim, new_catalog):
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins", "camera"))
    url_a = new_catalog()
    build_index(folder, tmp_path / "a", "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=url_a, options=OPTS)
    with pytest.raises(CatalogError, match="already belongs to an index"):
        build_index(folder, tmp_path / "b", "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=url_a, options=OPTS)
    build_index(folder, tmp_path / "c", "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    assert verify_index(tmp_path / "a").ok and verify_index(tmp_path / "c").ok


def _content_indexes(catalog) -> set[str]:
    """The catalog's indexes on content_hash, by name (from the database's own list: SQLAlchemy's inspector
    skips expression indexes on SQLite)."""
    with catalog.engine.connect() as c:
        sql = ("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'robret_files'"
               if c.dialect.name == "sqlite" else "SELECT indexname FROM pg_indexes WHERE tablename = 'robret_files'")
        names = {r[0] for r in c.exec_driver_sql(sql)}
    return names & {"ix_robret_files_content_prefix", "ix_robret_files_content_hash"}


def _content_plan(catalog, digest: str) -> str:
    """The query plan of `Catalog.ids_with_content`'s statement (sequential scans discouraged on PostgreSQL, whose
    planner would rather scan a table of five rows)."""
    from index.catalog import with_content

    stmt = with_content(digest, prefix=catalog.schema_version >= 3)  # what `ids_with_content` runs
    with catalog.engine.connect() as c:
        if c.dialect.name == "sqlite":
            sql = stmt.compile(c, compile_kwargs={"literal_binds": True})
            return " ".join(str(r[-1]) for r in c.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
        c.exec_driver_sql("SET enable_seqscan = off")
        sql = stmt.compile(c, compile_kwargs={"literal_binds": True})
        return " ".join(r[0] for r in c.exec_driver_sql(f"EXPLAIN {sql}"))


def test_content_hashes_are_found_through_their_prefix_index_and_a_schema_2_catalog_is_migrated_by_its_writer(
        tmp_path, sample_folder, tiny_lipsim, new_catalog):
    import shutil

    from index.catalog import SCHEMA_VERSION

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins", "camera"))
    shutil.copy2(folder / "moon.png", folder / "moon-copy.png")
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    with Gallery.open(index_dir) as g:
        recs = {r.path: r for r in g.catalog.find()}
        digest = recs["moon.png"].content_hash
        twins = sorted([recs["moon.png"].id, recs["moon-copy.png"].id])
        assert g.catalog.meta()["schema_version"] == SCHEMA_VERSION == 3
        assert _content_indexes(g.catalog) == {"ix_robret_files_content_prefix"}
        assert "ix_robret_files_content_prefix" in _content_plan(g.catalog, digest)
        coins = recs["coins.png"]
        assert g.same_content(digest) == twins and g.same_content(coins.content_hash) == [coins.id]
        assert g.same_content(digest[:16] + "0" * 48) == []  # the prefix matches, the hash does not
        _to_schema_2(g.catalog)
    with Gallery.open(index_dir) as g:  # a reader reads it as it is, and changes nothing
        assert g.same_content(digest) == twins and g.same_content(None) == []
        assert g.catalog.meta()["schema_version"] == 2
        assert _content_indexes(g.catalog) == {"ix_robret_files_content_hash"}
        if g.catalog.engine.dialect.name == "postgresql":  # (SQLite's planner prefers the status index here)
            assert "ix_robret_files_content_hash" in _content_plan(g.catalog, digest)  # schema 2's index serves it
    (folder / "camera.png").unlink()
    assert update_index(index_dir, encoder=tiny_lipsim, options=OPTS).removed == 1  # the writer migrates
    with Gallery.open(index_dir) as g:
        assert g.catalog.meta()["schema_version"] == 3
        assert _content_indexes(g.catalog) == {"ix_robret_files_content_prefix"}
        assert "ix_robret_files_content_prefix" in _content_plan(g.catalog, digest)
        assert g.same_content(digest) == twins
    assert verify_index(index_dir).ok


def test_a_failed_migration_leaves_the_catalog_as_it_was(tmp_path, sample_folder, tiny_lipsim, new_catalog,
                                                         monkeypatch):
    from index import catalog as catalog_mod

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins"))
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    with Gallery.open(index_dir) as g:
        _to_schema_2(g.catalog)
    # The last step fails (after the version's update and the new index): the transaction must undo both.
    with monkeypatch.context() as m, pytest.raises(Exception, match="(?i)syntax"):
        m.setattr(catalog_mod, "HEX_CONTENT_INDEX", "ix_robret_files_content_hash CASCADE RESTRICT (")
        update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    with Gallery.open(index_dir) as g:
        assert g.catalog.meta()["schema_version"] == 2
        assert _content_indexes(g.catalog) == {"ix_robret_files_content_hash"}
    update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
    with Gallery.open(index_dir) as g:
        assert g.catalog.meta()["schema_version"] == 3
        assert _content_indexes(g.catalog) == {"ix_robret_files_content_prefix"}
    assert verify_index(index_dir).ok


def _to_schema_2(catalog) -> None:
    """What schema 2 had: the index on all 64 characters of content_hash, and its version."""
    with catalog.engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_robret_files_content_prefix")
        c.exec_driver_sql("CREATE INDEX ix_robret_files_content_hash ON robret_files (content_hash)")
        catalog.set_meta({"schema_version": 2}, c)


def test_a_writer_refused_another_index_s_catalog_leaves_it_unmigrated(tmp_path, sample_folder, tiny_lipsim,
                                                                       new_catalog):
    import json

    from index.catalog import Catalog

    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins"))
    url_a = new_catalog()
    build_index(folder, tmp_path / "a", "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=url_a, options=OPTS)
    build_index(folder, tmp_path / "b", "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    cat = Catalog.open(url_a)
    _to_schema_2(cat)
    cat.close()
    config = tmp_path / "b" / "robret-index.json"  # b's configuration names a's catalog (a user's mistake)
    config.write_text(json.dumps({**json.loads(config.read_text()), "catalog": json.loads(
        (tmp_path / "a" / "robret-index.json").read_text())["catalog"]}))
    with pytest.raises(CatalogError, match="belongs to another index"):
        update_index(tmp_path / "b", encoder=tiny_lipsim, options=OPTS)
    cat = Catalog.open(url_a, read_only=True)
    try:  # a's catalog is a's to migrate, under a's lock
        assert cat.meta()["schema_version"] == 2 and _content_indexes(cat) == {"ix_robret_files_content_hash"}
    finally:
        cat.close()
    update_index(tmp_path / "a", encoder=tiny_lipsim, options=OPTS)
    assert verify_index(tmp_path / "a").ok


def test_a_catalog_created_over_an_older_robret_s_tables_gets_the_prefix_index(tmp_path, new_catalog):
    from index.catalog import SCHEMA_VERSION, Catalog, make_engine, metadata

    url = new_catalog()
    engine = make_engine(url)  # an older robret's creation, interrupted after its tables, before its metadata
    metadata.create_all(engine)
    with engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_robret_files_content_prefix")
        c.exec_driver_sql("CREATE INDEX ix_robret_files_content_hash ON robret_files (content_hash)")
    engine.dispose()
    cat = Catalog.create(url, {"root": "/x", "encoder": {"spec": "s", "name": "n", "dim": 3},
                               "index": {"version": 0, "rows": 0, "dim": 3, "factory": "Flat", "sha256": None}})
    try:
        assert cat.meta()["schema_version"] == SCHEMA_VERSION
        assert _content_indexes(cat) == {"ix_robret_files_content_prefix"}
    finally:
        cat.close()


def test_postgres_password_is_never_written_and_comes_from_the_environment(tmp_path, sample_folder,
                                                                           postgres_server, monkeypatch, capsys):
    folder = copy_photos(sample_folder, tmp_path / "photos", names=("moon", "coins"))
    index_dir = tmp_path / "index"
    database = postgres_server.create_database()
    with_password = postgres_server.url(database, PASSWORD)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    assert robret(["index", "build", str(folder), "--index-dir", str(index_dir), "--db", with_password,
                   "--encoder", "lipsim:cpu-tiny", "--cpu", "--no-progress"]) == 0
    assert robret(["index", "stats", str(index_dir)]) == 1  # no password anywhere: refused, with a message
    monkeypatch.setenv(DB_URL_ENV, with_password)  # the password from the environment …
    assert robret(["index", "stats", str(index_dir)]) == 0
    monkeypatch.delenv(DB_URL_ENV)
    pgpass = tmp_path / "pgpass"  # … or from libpq's password file
    pgpass.write_text(f"*:*:*:{postgres_server.user}:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    assert robret(["index", "verify", str(index_dir)]) == 0
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    pgpass.unlink()
    for dirpath, _dirs, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert PASSWORD.encode() not in f.read(), name


def test_build_killed_at_each_point_heals_on_each_catalog(tmp_path, sample_folder, tiny_lipsim, new_catalog):
    from index.ingest import CRASH_ENV

    folder = copy_photos(sample_folder, tmp_path / "photos", names=NAMES)
    clean = tmp_path / "clean"
    build_index(folder, clean, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    with Gallery.open(clean) as g:
        want = {r.path: g.vectors([r.id])[0] for r in g.catalog.find()}
    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for point in ("batch:1", "write:2", "rename:1", "commit:1"):
        index_dir = tmp_path / f"killed-{point.replace(':', '-')}"
        args = ["index", "build", str(folder), "--index-dir", str(index_dir), "--encoder", "lipsim:cpu-tiny",
                "--db", new_catalog(), "--batch-size", "2", "--checkpoint-seconds", "0", "--workers", "1",
                "--no-progress", "--cpu"]
        procs[point] = (index_dir, subprocess.Popen([sys.executable, "-m", "retrieval.cli", *args],
                                                    env={**env, CRASH_ENV: point}, cwd=ROOT,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for point, (index_dir, proc) in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, (point, err.decode()[-2000:])
        report = verify_index(index_dir)
        assert report.ok, (point, report.problems)
        update_index(index_dir, encoder=tiny_lipsim, options=OPTS)
        report = verify_index(index_dir)
        assert report.ok and not report.notes, (point, report.problems, report.notes)
        with Gallery.open(index_dir) as g:
            got = {r.path: g.vectors([r.id])[0] for r in g.catalog.find()}
        assert got.keys() == want.keys()
        for path in want:
            assert np.allclose(got[path], want[path], atol=1e-5), (point, path)


def test_verify_keeps_only_a_consistent_version_on_each_catalog(tmp_path, sample_folder, tiny_lipsim, new_catalog,
                                                                monkeypatch):
    from test_index_trust import verify_with_a_commit_midway

    folder = copy_photos(sample_folder, tmp_path / "photos", names=NAMES)
    index_dir = tmp_path / "index"
    build_index(folder, index_dir, "lipsim:cpu-tiny", encoder=tiny_lipsim, db_url=new_catalog(), options=OPTS)
    report = verify_with_a_commit_midway(folder, index_dir, tiny_lipsim, monkeypatch)
    assert report.ok, report.problems
    assert report.facts["indexed_rows"] == len(NAMES) - 1
