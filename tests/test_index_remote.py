"""Object-store sources against real servers on 127.0.0.1: moto's S3 server and gcp-storage-emulator.

Nothing is mocked: pyarrow's S3 and GCS clients talk HTTP to the servers. One bucket is filled once per
module; builds that only read it are shared.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from index import Gallery, IngestOptions, build_index, update_index, verify_index  # noqa: E402
from index.decode import DecodeError, DecodeLimits, read_bytes  # noqa: E402

from _index_fixtures import assert_same_index as same_index, catalog_rows as rows, copy_photos  # noqa: E402

SPEC = "lipsim:cpu-tiny"
OPTS = dict(workers=2, batch_size=4, use_gpu=False)
NAMES = ("astronaut", "brick", "camera", "coins", "moon")
KEY_ID = "AKIAROBRETTESTKEY0001"
SECRET = "robret-test-secret-Zq8vX3pW9mK2"  # must never reach a file robret writes, or its output
BUCKET = "photos"


@pytest.fixture(scope="module")
def env():
    """The process environment the stores are reached with (credentials only here), restored after."""
    saved = dict(os.environ)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ROBRET_ANONYMOUS", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def s3(env):
    """A boto3 client of a moto S3 server on a free loopback port, which ROBRET_S3_ENDPOINT names."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env["ROBRET_S3_ENDPOINT"] = endpoint
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def upload(client, folder: Path, prefix: str, bucket: str = BUCKET) -> list[str]:
    """Every file of `folder` (recursively) as an object under `prefix`; their URIs."""
    uris = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        uris.append(f"s3://{bucket}/{key}")
    return uris


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sample_folder):
    root = tmp_path_factory.mktemp("remote") / "gallery"
    copy_photos(sample_folder, root / "sub", NAMES[3:])
    copy_photos(sample_folder, root, NAMES[:3])
    (root / "notes.png").write_text("a text file named as an image\n")
    (root / "readme.txt").write_text("not an image name: ignored\n")
    return root


@pytest.fixture(scope="module")
def gallery_uris(s3, folder):
    return upload(s3, folder, "gallery")


@pytest.fixture(scope="module")
def local_index(folder, tmp_path_factory, tiny_lipsim):
    out = tmp_path_factory.mktemp("local") / "index"
    build_index(folder, out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    return out


@pytest.fixture(scope="module")
def s3_index(gallery_uris, tmp_path_factory, tiny_lipsim):
    out = tmp_path_factory.mktemp("s3") / "index"
    report = build_index(f"s3://{BUCKET}/gallery/", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    return out, report


def assert_same_index(a, b) -> None:
    same_index(a, b, atol=1e-5)


def written_text(*dirs) -> bytes:
    return b"".join(p.read_bytes() for d in dirs for p in Path(d).rglob("*") if p.is_file())


# Builds -----------------------------------------------------------------------------------------
def test_build_from_a_bucket_prefix_equals_the_local_build_of_the_same_files(s3_index, local_index):
    out, report = s3_index
    assert report.root == f"s3://{BUCKET}/gallery"
    assert report.indexed == 5 and dict(report.failed) == {"notes.png": "text: a text file, not an image "
                                                          "(despite its extension)"}
    assert_same_index(local_index, out)
    assert json.loads((out / "robret-index.json").read_text())["root"] == f"s3://{BUCKET}/gallery"
    with Gallery.open(out, use_gpu=False) as g:
        assert g.root == f"s3://{BUCKET}/gallery"
        assert str(g.path(rows(out)["sub/moon.png"][0])) == f"s3://{BUCKET}/gallery/sub/moon.png"
    assert verify_index(out, check_files=True).notes == []


def test_a_list_file_of_object_uris_builds_the_same_index(gallery_uris, local_index, tmp_path, tiny_lipsim):
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(u + "\n" for u in gallery_uris if u.endswith(".png")))
    out = tmp_path / "index"
    report = build_index(f"@{listing}", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert report.root == f"s3://{BUCKET}/gallery"  # the deepest prefix holding every listed object
    assert_same_index(local_index, out)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "uris.parquet"
    pq.write_table(pa.table({"path": listing.read_text().split()}), table)
    build_index(str(table), tmp_path / "parquet", SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS),
                root=f"s3://{BUCKET}/gallery")
    assert_same_index(local_index, tmp_path / "parquet")


def test_root_confinement_refuses_hostile_keys_and_entries_outside_the_root_without_reading_them(
        s3, gallery_uris, sample_folder, tmp_path, tiny_lipsim):
    secret_png = (sample_folder / "coffee.png").read_bytes()
    s3.put_object(Bucket=BUCKET, Key="private/coffee.png", Body=secret_png)
    for key in ("hostile/../private/coffee.png", "hostile/./coffee.png", "hostile//coffee.png", "/hostile/x.png",
                "hostile/ctl\x01.png", "hostile/back\\slash.png", "hostile/.hidden.png"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=secret_png)
    s3.put_object(Bucket=BUCKET, Key="hostile/ok.png", Body=(sample_folder / "brick.png").read_bytes())
    s3.put_object(Bucket=BUCKET, Key="hostile-sibling/coffee.png", Body=secret_png)
    # a prefix listing: unsafe keys are failures; a sibling prefix and hidden names are never listed
    out = tmp_path / "prefix"
    report = build_index(f"s3://{BUCKET}/hostile", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    kinds = {path: reason.split(":", 1)[0] for path, reason in report.failed}
    assert kinds == {"../private/coffee.png": "unsafe_name", "./coffee.png": "unsafe_name",
                     "/coffee.png": "unsafe_name", "ctl\x01.png": "unsafe_name", "back\\slash.png": "unsafe_name"}
    assert report.indexed == 1 and report.ignored == 1
    from index.decode import hash_bytes

    assert hash_bytes(secret_png) not in {r[3] for r in rows(out).values()}
    # a list under --root: outside the root, other buckets, local paths, credentials in a URI
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join([
        f"s3://{BUCKET}/hostile/ok.png", f"s3://{BUCKET}/private/coffee.png", f"s3://{BUCKET}/hostile-sibling/coffee.png",
        f"s3://{BUCKET}/hostile/../private/coffee.png", "s3://other/hostile/ok.png", str(sample_folder / "coffee.png"),
        f"s3://{KEY_ID}:{SECRET}@{BUCKET}/hostile/ok.png", f"s3://{BUCKET}/hostile/missing.png",
        f"s3://{BUCKET}/hostile/ok.txt", f"gs://{BUCKET}/hostile/ok.png"]) + "\n")
    out2 = tmp_path / "list"
    report = build_index(f"@{listing}", out2, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS),
                         root=f"s3://{BUCKET}/hostile")
    kinds = {path: reason.split(":", 1)[0] for path, reason in report.failed}
    assert kinds == {
        f"s3://{BUCKET}/private/coffee.png": "outside_root", f"s3://{BUCKET}/hostile-sibling/coffee.png": "outside_root",
        "../private/coffee.png": "unsafe_name", "s3://other/hostile/ok.png": "outside_root",
        str(sample_folder / "coffee.png"): "outside_root", f"s3://***@{BUCKET}/hostile/ok.png": "unsafe_name",
        "missing.png": "missing", "ok.txt": "not_image", f"gs://{BUCKET}/hostile/ok.png": "outside_root"}
    assert report.indexed == 1
    assert hash_bytes(secret_png) not in {r[3] for r in rows(out2).values()}
    assert SECRET.encode() not in written_text(out2)
    # every read is confined again, whoever reads: a key swapped in later cannot lead elsewhere
    for path, kind in ((f"s3://{BUCKET}/hostile/../private/coffee.png", "unsafe_name"),
                       (f"s3://{BUCKET}/private/coffee.png", "outside_root")):
        with pytest.raises(DecodeError) as exc:
            read_bytes(path, 10**7, root=f"s3://{BUCKET}/hostile")
        assert exc.value.kind == kind


def test_a_text_object_and_an_object_over_the_size_limit_are_failures_and_the_large_one_is_never_downloaded(
        s3, sample_folder, tmp_path, tiny_lipsim, caplog):
    s3.put_object(Bucket=BUCKET, Key="bad/ok.png", Body=(sample_folder / "moon.png").read_bytes())
    s3.put_object(Bucket=BUCKET, Key="bad/notes.png", Body=b"hello, I am text\n" * 10)
    s3.put_object(Bucket=BUCKET, Key="bad/big.png", Body=b"\x89PNG\r\n\x1a\n" + os.urandom(3_000_000))
    limit = DecodeLimits(max_bytes=2_000_000)
    caplog.set_level(logging.INFO, logger="werkzeug")
    report = build_index(f"s3://{BUCKET}/bad", tmp_path / "index", SPEC, encoder=tiny_lipsim,
                         options=IngestOptions(**OPTS, limits=limit))
    kinds = {path: reason for path, reason in report.failed}
    assert kinds == {"notes.png": "text: a text file, not an image (despite its extension)",
                     "big.png": "too_large: 3000008 bytes exceeds the 2000000-byte limit"}
    assert report.indexed == 1
    requests = [r.getMessage() for r in caplog.records if "/bad/big.png" in r.getMessage()]
    assert requests and not any("GET /" in m for m in requests), requests  # asked its size, never its body


def test_update_lists_the_bucket_again_and_embeds_only_new_and_changed_objects(s3, sample_folder, tmp_path,
                                                                                tiny_lipsim):
    def put(key, name):
        s3.put_object(Bucket=BUCKET, Key=f"upd/{key}", Body=(sample_folder / f"{name}.png").read_bytes())

    for key in ("a", "b", "c"):
        put(f"{key}.png", {"a": "astronaut", "b": "brick", "c": "camera"}[key])
    out = tmp_path / "index"
    build_index(f"s3://{BUCKET}/upd", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    before = rows(out)
    report = update_index(out, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert (report.embedded, report.unchanged, report.removed) == (0, 3, 0)
    put("d.png", "coins")  # new
    put("b.png", "moon")  # changed
    s3.delete_object(Bucket=BUCKET, Key="upd/c.png")  # deleted
    report = update_index(out, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert (report.indexed, report.updated, report.unchanged, report.removed, report.total) == (1, 1, 1, 1, 3)
    after = rows(out)
    assert after["a.png"] == before["a.png"]
    assert after["b.png"][0] == before["b.png"][0] and after["b.png"][3] != before["b.png"][3]  # same id, new hash
    assert after["c.png"][1] == "removed" and after["d.png"][1] == "indexed"
    assert verify_index(out, check_files=True).ok


def test_credentials_never_reach_the_catalog_the_index_json_or_the_output(s3, s3_index, gallery_uris, tmp_path,
                                                                        capsys):
    from retrieval.cli import main

    out = tmp_path / "cli"
    assert main(["index", "build", f"s3://{BUCKET}/gallery", "--index-dir", str(out), "--encoder", SPEC,
                 "--cpu", "--no-progress"]) == 0
    assert main(["index", "stats", "--index-dir", str(out)]) == 0
    assert main(["index", "build", f"s3://{KEY_ID}:{SECRET}@{BUCKET}/gallery", "--index-dir",
                 str(tmp_path / "refused")]) == 2
    assert main(["index", "build", "s3://no-such-bucket/x", "--index-dir", str(tmp_path / "nobucket")]) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "with credentials" in text and "does not exist" in text and f"s3://{BUCKET}/gallery" in text
    for secret in (SECRET, KEY_ID):
        assert secret not in text
        assert secret.encode() not in written_text(out, s3_index[0])
    assert not (tmp_path / "refused").exists()


def test_serve_shows_an_object_store_item_through_the_confined_read(s3_index):
    pytest.importorskip("fastapi")
    from test_serve import ServerThread, request

    from retrieval.serve import ServeConfig, create_app

    out, _ = s3_index
    item = rows(out)["sub/coins.png"][0]
    with ServerThread(create_app(out, ServeConfig(use_gpu=False))) as server:
        status, body = request(server.port, "GET", f"/items/{item}")
    assert status == 200, body
    assert body["item"]["path"] == "sub/coins.png" and body["thumbnail"]["media_type"] == "image/jpeg"


# Ray and GCS ------------------------------------------------------------------------------------
def test_ray_build_from_s3_reads_the_objects_in_the_actors_and_equals_the_local_build(s3_index, tmp_path,
                                                                                      tiny_lipsim):
    ray = pytest.importorskip("ray")
    from index.ray_embed import RayEmbedder

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "index"
        report = build_index(f"s3://{BUCKET}/gallery", out, SPEC, encoder=tiny_lipsim,
                             options=IngestOptions(**OPTS, embed_files=RayEmbedder(actors=1, batch_size=8)))
    finally:
        ray.shutdown()
    assert report.indexed == 5
    assert_same_index(s3_index[0], out)


@pytest.fixture(scope="module")
def gcs(env):
    """A gcp-storage-emulator on a free loopback port (STORAGE_EMULATOR_HOST names it) with a bucket."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="gphotos")
    server.start()
    env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    yield "gphotos"
    server.stop()


def test_gcs_build_through_the_emulator_equals_the_local_build(gcs, folder, local_index, tmp_path, tiny_lipsim):
    from index.remote import filesystem

    fs = filesystem("gs")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"{gcs}/gallery/{path.relative_to(folder).as_posix()}") as f:
            f.write(path.read_bytes())
    out = tmp_path / "index"
    report = build_index(f"gs://{gcs}/gallery", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert report.root == f"gs://{gcs}/gallery" and report.indexed == 5
    assert_same_index(local_index, out)


def test_the_endpoint_comes_from_robret_s3_endpoint_first_and_anonymous_access_is_a_setting(s3, env):
    from index.remote import read_object, settings

    endpoint = env["ROBRET_S3_ENDPOINT"]
    saved = {k: env.get(k) for k in ("ROBRET_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "ROBRET_ANONYMOUS")}
    try:
        env.update(AWS_ENDPOINT_URL="http://general:1", AWS_ENDPOINT_URL_S3="http://s3-only:2")
        assert settings("s3")[1] == endpoint
        del env["ROBRET_S3_ENDPOINT"]
        assert settings("s3")[1] == "http://s3-only:2"
        del env["AWS_ENDPOINT_URL_S3"]
        assert settings("s3")[1] == "http://general:1"
        env.update(ROBRET_S3_ENDPOINT=endpoint, ROBRET_ANONYMOUS="1")
        assert settings("s3")[3] is True
        body = b"\x89PNG\r\n\x1a\n" + bytes(64)
        s3.put_object(Bucket=BUCKET, Key="public/x.png", Body=body, ACL="public-read")
        s3.put_object(Bucket=BUCKET, Key="public/private.png", Body=body)
        assert read_object(f"s3://{BUCKET}/public/x.png", 10**6) == body  # unsigned requests
        with pytest.raises(DecodeError, match="^permission: access denied"):
            read_object(f"s3://{BUCKET}/public/private.png", 10**6)
    finally:
        for k, v in saved.items():
            env.pop(k, None) if v is None else env.__setitem__(k, v)


def test_an_object_whose_read_failed_outside_the_object_is_retried_at_the_next_update(s3, gallery_uris, tmp_path,
                                                                                      tiny_lipsim):
    import sqlite3

    out = tmp_path / "index"
    build_index(f"s3://{BUCKET}/gallery", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    # as if the text object's read had failed on a dropped connection (size and mtime unchanged)
    with sqlite3.connect(out / "catalog.sqlite") as db:
        changed = db.execute("UPDATE robret_files SET reason = 'unreadable: connection reset' "
                             "WHERE path = 'notes.png'")
        assert changed.rowcount == 1
    report = update_index(out, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert [p for p, _ in report.failed] == ["notes.png"] and report.still_failed == 0
    assert rows(out)["notes.png"][2] == "text"  # read again: the object's own failure this time
    report = update_index(out, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert report.failed == [] and report.still_failed == 1  # the object's own failure is not retried
