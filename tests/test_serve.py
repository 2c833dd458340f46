"""The search service over real HTTP: a uvicorn server on a free loopback port, requests via http.client."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from index import Gallery, IngestOptions, build_index, update_index  # noqa: E402
from retrieval.search import search_image  # noqa: E402
from retrieval.serve import ServeConfig, create_app  # noqa: E402

from _index_fixtures import copy_photos, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIRST = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins")
LATER = ("grass", "gravel", "moon")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread, for the length of a `with`."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def request(port, method, path, body=b"", headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        kind = resp.getheader("content-type", "")
        return resp.status, (json.loads(data) if kind.startswith("application/json") else data)
    finally:
        conn.close()


def multipart(fields=(), files=()):
    """(body, headers) of a multipart/form-data request: fields [(name, value)], files [(name, filename, bytes)]."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post(port, path, fields=(), files=(), headers=None):
    body, h = multipart(fields, files)
    return request(port, "POST", path, body, {**h, **(headers or {})})


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_folder, tiny_lipsim):
    base = tmp_path_factory.mktemp("serve")
    folder = copy_photos(sample_folder, base / "photos", FIRST)
    build_index(folder, base / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    config = ServeConfig(max_body_bytes=1024 * 1024, max_pixels=4_000_000, use_gpu=False)
    with ServerThread(create_app(base / "index", config, encoder=tiny_lipsim)) as server:
        server.folder, server.index_dir = folder, base / "index"
        yield server


def test_search_by_upload_returns_the_query_commands_json_with_certificates(served, sample_folder, tiny_lipsim):
    data = (sample_folder / "coffee.png").read_bytes()
    status, body = post(served.port, "/search", [("k", "3"), ("eps", "0.001")], [("file", "q.png", data)])
    assert status == 200, body
    with Gallery.open(served.index_dir, encoder=tiny_lipsim, use_gpu=False) as g:
        expected = search_image(g, str(served.folder / "coffee.png"), k=3, eps=0.001).to_dict()
    assert {k: v for k, v in body.items() if k not in ("query", "encoder", "index_version")} == expected
    assert body["encoder"] == "lipsim:cpu-tiny" and body["query"]["bytes"] == len(data)
    assert body["hits"][0]["path"].endswith("coffee.png") and body["set_radius"] > 0
    assert all(h["radius"] is not None for h in body["hits"])


def test_search_by_id_with_exclude_self_drops_it_and_stays_certified(served, tiny_lipsim):
    with Gallery.open(served.index_dir, encoder=tiny_lipsim, use_gpu=False) as g:
        ids = [int(i) for i in g.ids()]
        target = next(i for i in ids if g.path(i).name == "brick.png")
        full = search_image(g, str(g.path(target)), k=len(ids)).to_dict()
        without = search_image(g, str(g.path(target)), k=3, exclude=[target]).to_dict()
    status, body = post(served.port, "/search", [("id", str(target)), ("k", "3")])
    assert status == 200 and body["hits"][0]["id"] == target and body["query"]["id"] == target
    status, body = post(served.port, "/search", [("id", str(target)), ("k", "3"), ("exclude_self", "true")])
    assert status == 200
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in full["hits"][1:4]]
    assert body["hits"] == without["hits"] and body["set_radius"] == without["set_radius"] > 0


def test_batch_mixes_uploads_and_ids_with_one_error_per_bad_item(served, sample_folder):
    good = (sample_folder / "camera.png").read_bytes()
    status, body = post(served.port, "/search/batch", [("ids", "999999"), ("k", "2")],
                        [("files", "a.png", good), ("files", "b.txt", b"just some text, not an image\n")])
    assert status == 200
    first, text, missing = body["results"]
    assert first["hits"][0]["path"].endswith("camera.png") and len(first["hits"]) == 2
    assert text["error"]["status"] == 422 and text["error"]["kind"] == "text"
    assert missing["error"]["status"] == 404
    assert [r["query"].get("upload") for r in (first, text)] == ["a.png", "b.txt"] and missing["query"]["id"] == 999999


def test_bad_uploads_are_4xx_with_a_message(served):
    bomb = png_bytes(50_000, 50_000, 1, 0, b"\x00" * 64)  # 2.5 gigapixels declared in 100 bytes
    status, body = post(served.port, "/search", files=[("file", "bomb.png", bomb)])
    assert status == 413 and "too_many_pixels" in body["detail"]
    status, body = post(served.port, "/search", files=[("file", "x.png", b"hello, this is text\n" * 5)])
    assert status == 422 and body["kind"] == "text"
    status, body = post(served.port, "/search", files=[("file", "x.png", os.urandom(3000))])
    assert status == 422 and body["kind"] == "not_image"
    status, body = post(served.port, "/search", files=[("file", "x.png", b"")])
    assert status == 422 and body["detail"]
    status, body = post(served.port, "/search", [("k", "2")])
    assert status == 422 and "exactly one" in body["detail"]


def test_huge_declared_body_is_refused_before_it_is_sent(served):
    # Only the headers go out: a server that waited for the declared gigabyte would time out.
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"Too Large" in resp.read()
    conn.close()


def test_huge_chunked_body_is_refused_while_it_is_read(served):
    body, headers = multipart([("k", "1")], [("file", "big.png", b"\x89PNG" + b"\x00" * (3 * 1024 * 1024))])
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=20)
    chunks = (body[i:i + 16384] for i in range(0, len(body), 16384))
    try:
        conn.request("POST", "/search", body=chunks, headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        assert resp.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed before the client finished sending
    finally:
        conn.close()


def test_no_request_path_reaches_the_file_system(served, tmp_path):
    for path in ("/items/..%2F..%2Fetc%2Fpasswd", "/items/../../etc/passwd", "/items/-1", "/items/%2Fetc%2Fpasswd"):
        status, _ = request(served.port, "GET", path)
        assert status in (404, 422), path
    status, body = post(served.port, "/search", [("id", "../../etc/passwd")])
    assert status == 422
    # An upload's file name is never used as a path.
    status, body = post(served.port, "/search", files=[("file", "../../../etc/passwd", b"root:x:0:0\n" * 10)])
    assert status == 422 and body["kind"] == "text" and body.get("query") is None


def test_item_outside_the_root_after_indexing_is_refused(served, tiny_lipsim, tmp_path):
    with Gallery.open(served.index_dir, encoder=tiny_lipsim, use_gpu=False) as g:
        target = next(int(i) for i in g.ids() if g.path(int(i)).name == "coins.png")
        path = g.path(target)
    status, body = request(served.port, "GET", f"/items/{target}")
    assert status == 200 and body["item"]["path"] == "coins.png" and body["item"]["status"] == "indexed"
    thumb = Image.open(io.BytesIO(base64.b64decode(body["thumbnail"]["base64"])))
    assert thumb.format == "JPEG" and max(thumb.size) == 128
    secret = tmp_path / "secret.png"
    shutil.copy2(path, secret)
    saved = path.read_bytes()
    path.unlink()
    path.symlink_to(secret)  # the indexed name now leads outside the folder
    try:
        status, body = request(served.port, "GET", f"/items/{target}")
        assert status == 404 and "inside the indexed folder" in body["detail"]
        status, body = post(served.port, "/search", [("id", str(target))])
        assert status == 404
    finally:
        path.unlink()
        path.write_bytes(saved)


def test_an_id_beyond_64_bits_is_404_and_an_eps_that_is_not_a_finite_radius_is_422(served):
    huge = str(10 ** 20)
    assert request(served.port, "GET", f"/items/{huge}")[0] == 404
    assert post(served.port, "/search", [("id", huge)])[0] == 404
    status, body = post(served.port, "/search/batch", [("ids", huge)])
    assert status == 200 and body["results"][0]["error"]["status"] == 404
    for eps in ("-1", "nan", "inf"):
        status, body = post(served.port, "/search", [("id", "1"), ("eps", eps)])
        assert status == 422 and "eps must be a finite number" in body["detail"], eps
        assert post(served.port, "/search/batch", [("ids", "1"), ("eps", eps)])[0] == 422


def test_a_file_name_that_is_not_utf8_is_served_escaped(tmp_path, sample_folder, tiny_lipsim):
    photos = tmp_path / "photos"
    copy_photos(sample_folder, photos, ("astronaut", "brick"))
    odd = os.path.join(os.fsencode(photos), b"caf\xe9.png")
    shutil.copy(sample_folder / "coffee.png", odd)
    build_index(photos, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    with Gallery.open(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False) as g:
        target = next(int(i) for i in g.ids() if os.fsencode(g.path(int(i))) == odd)
    shown = str(photos) + "/caf\\xe9.png"
    app = create_app(tmp_path / "index", ServeConfig(use_gpu=False), encoder=tiny_lipsim)
    with ServerThread(app) as server:
        status, body = post(server.port, "/search", [("id", str(target)), ("k", "3")])
        assert status == 200, body
        assert body["query"]["path"] == shown and body["hits"][0]["path"] == shown
        data = (sample_folder / "coffee.png").read_bytes()
        status, body = post(server.port, "/search", [("k", "1")], [("file", "q.png", data)])
        assert status == 200 and body["hits"][0]["path"] == shown
        status, body = post(server.port, "/search/batch", [("ids", str(target)), ("k", "1")])
        assert status == 200 and body["results"][0]["hits"][0]["path"] == shown


def test_token_required_when_configured(served, tiny_lipsim, sample_folder):
    app = create_app(served.index_dir, ServeConfig(token="s3cret", use_gpu=False), encoder=tiny_lipsim)
    with ServerThread(app) as server:
        assert request(server.port, "GET", "/healthz")[0] == 200
        status, body = request(server.port, "GET", "/stats")
        assert status == 401 and "bearer token" in body["detail"]
        assert request(server.port, "GET", "/stats", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, body = request(server.port, "GET", "/stats", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and "catalog" not in body["index"]
        data = (sample_folder / "coins.png").read_bytes()
        assert post(server.port, "/search", files=[("file", "q.png", data)])[0] == 401
        status, _ = post(server.port, "/search", files=[("file", "q.png", data)],
                         headers={"Authorization": "Bearer s3cret"})
        assert status == 200


def test_openapi_schema_lists_the_routes(served):
    status, body = request(served.port, "GET", "/openapi.json")
    assert status == 200
    assert {"/search", "/search/batch", "/items/{item_id}", "/healthz", "/stats"} <= set(body["paths"])


def test_new_index_version_is_picked_up_while_serving(served, sample_folder, tiny_lipsim):
    status, before = request(served.port, "GET", "/healthz")
    assert status == 200 and before["items"] == len(FIRST)
    copy_photos(sample_folder, served.folder, LATER)
    try:
        report = update_index(served.index_dir, encoder=tiny_lipsim, options=IngestOptions(workers=1, use_gpu=False))
        status, after = request(served.port, "GET", "/healthz")
        assert after["index_version"] == report.index_version > before["index_version"]
        assert after["items"] == len(FIRST) + len(LATER)
        status, body = post(served.port, "/search", [("k", "1")],
                            [("file", "q.png", (sample_folder / "moon.png").read_bytes())])
        assert status == 200 and body["hits"][0]["path"].endswith("moon.png")
        assert body["index_version"] == report.index_version
        stats = request(served.port, "GET", "/stats")[1]
        assert stats["serving"]["reloads"] >= 1 and stats["serving"]["items"] == len(FIRST) + len(LATER)
    finally:
        for name in LATER:
            (served.folder / f"{name}.png").unlink()
        update_index(served.index_dir, encoder=tiny_lipsim, options=IngestOptions(workers=1, use_gpu=False))


def test_serve_command_refuses_a_public_address_without_a_token_and_serves_on_loopback(served):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ROBRET_API_TOKEN", None)
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "--index-dir", str(served.index_dir), "--cpu"]
    done = subprocess.run(cmd + ["--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "ROBRET_API_TOKEN" in done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cmd + ["--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = request(port, "GET", "/healthz", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "robret serve did not start"
                time.sleep(0.2)
        assert status == 200 and body["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(20)
    assert f"on http://127.0.0.1:{port}" in proc.stderr.read()
    with socket.socket() as taken:  # a port in use: said before the model loads, and nothing claims to serve
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        done = subprocess.run(cmd + ["--port", str(busy)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{busy}" in done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr


def test_request_past_its_deadline_is_answered_504(served, tiny_lipsim, sample_folder):
    app = create_app(served.index_dir, ServeConfig(request_timeout=1e-4, use_gpu=False), encoder=tiny_lipsim)
    with ServerThread(app) as server:
        status, body = post(server.port, "/search", files=[("file", "q.png", (sample_folder / "coffee.png").read_bytes())])
        assert status == 504 and "longer than" in body["detail"]


def test_load_benchmark_quick_run_answers_every_request(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--quick", "--out", str(tmp_path / "load")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["requests"] == 40 and result["errors"] == 0 and result["certified_answers"] == 40
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert result["throughput_rps"] > 0 and result["server_rss_mb"]["after_run"] > 0


def test_a_request_holding_the_previous_version_keeps_searching_after_the_reload(tmp_path, sample_folder, tiny_lipsim):
    """The holder re-opens on a new version; a request that took the old gallery before (a mapped Flat
    store) still searches it, and answers from that version."""
    from retrieval.serve import GalleryHolder
    folder = copy_photos(sample_folder, tmp_path / "photos", FIRST)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    holder = GalleryHolder(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False)
    old = holder.current()
    ids, vectors = old.all_vectors()
    copy_photos(sample_folder, folder, LATER)
    update_index(tmp_path / "index", encoder=tiny_lipsim, options=IngestOptions(workers=1, use_gpu=False))
    new = holder.current()
    assert new is not old and len(new) == len(FIRST) + len(LATER) and holder.reloads == 1
    scores, found = old.search(vectors, len(FIRST) + len(LATER))
    assert list(found[:, 0]) == list(ids) and (found[:, len(FIRST):] == -1).all()
    holder.close()
    with pytest.raises(Exception, match="closed"):
        new.search(vectors[:1], 1)


def test_a_reload_after_an_appended_segment_codes_only_the_new_rows(tmp_path, sample_folder, tiny_lipsim, monkeypatch):
    import index.gallery
    from index.codes import QuantizedCodes
    from retrieval.serve import GalleryHolder
    from test_quantized_search import _same_codes

    monkeypatch.setattr(index.gallery, "QUANTIZED_MIN", 0)
    folder = copy_photos(sample_folder, tmp_path / "photos", FIRST)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    holder = GalleryHolder(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False)
    old = holder.current()
    old._codes_thread.join(60)
    copy_photos(sample_folder, folder, LATER)
    update_index(tmp_path / "index", encoder=tiny_lipsim, options=IngestOptions(workers=1, use_gpu=False))
    new = holder.current()
    new._codes_thread.join(60)
    assert [f["kind"] for f in new.meta["index"]["segments"]] == ["faiss", "rows"]
    assert new.quantized.reused == len(FIRST) and len(new.quantized) == len(FIRST) + len(LATER)
    _same_codes(new.quantized, QuantizedCodes.from_store(new.store))  # bit for bit (ids, codes, scales, residuals)
    base = new.quantized.parts[0]  # (the base's arrays: old's, held once)
    assert base.codes is old.quantized.parts[0].codes
    assert new.quantized.shared_bytes == base.codes.nbytes + base.scale.nbytes + base.resid.nbytes > 0
    holder.close()


def test_a_reload_during_the_older_version_s_build_waits_for_it_and_copies_its_codes(tmp_path, sample_folder,
                                                                                      tiny_lipsim, monkeypatch):
    # A writer that commits faster than a full build: the older build is not abandoned at the reload (before, it
    # was stopped, and under steady commits no version ever finished its codes); the newer one copies from it.
    import threading

    import index.codes
    import index.gallery
    from retrieval.serve import GalleryHolder

    monkeypatch.setattr(index.gallery, "QUANTIZED_MIN", 0)
    release = threading.Event()
    real = index.codes.quantize

    def held(vectors):  # every coding waits until the test lets it go
        release.wait(30)
        return real(vectors)

    monkeypatch.setattr(index.codes, "quantize", held)
    folder = copy_photos(sample_folder, tmp_path / "photos", FIRST)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    holder = GalleryHolder(tmp_path / "index", encoder=tiny_lipsim, use_gpu=False)
    old = holder.current()
    assert old.quantizing
    copy_photos(sample_folder, folder, LATER)
    update_index(tmp_path / "index", encoder=tiny_lipsim, options=IngestOptions(workers=1, use_gpu=False))
    new = holder.current()  # the reload, while the older build still waits
    assert new is not old and old.quantizing and new.quantizing
    release.set()
    new._codes_thread.join(60)
    assert old.quantized is not None and len(old.quantized) == len(FIRST)
    assert new.quantized.reused == len(FIRST) and len(new.quantized) == len(FIRST) + len(LATER)
    holder.close()


def test_the_service_builds_codes_and_answers_from_them_with_the_same_certificate(served, tiny_lipsim, monkeypatch):
    import index.gallery

    monkeypatch.setattr(index.gallery, "QUANTIZED_MIN", 0)  # the sample gallery is far below 100,000 vectors
    answers = {}
    for codes in (True, False):
        app = create_app(served.index_dir, ServeConfig(use_gpu=False, codes=codes), encoder=tiny_lipsim)
        g = app.state.holder.current()
        if codes:
            g._codes_thread.join(60)
        assert (g.quantized is not None) == codes
        with ServerThread(app) as server:
            target = int(g.ids()[2])
            status, body = post(server.port, "/search", [("id", str(target)), ("k", "4"), ("exclude_self", "true")])
            state = request(server.port, "GET", "/stats")[1]["serving"]["codes"]
        assert status == 200, body
        answers[codes] = body
        assert state == ({"state": "ready", "vectors": len(g), "bytes": g.quantized.nbytes, "reused": 0,
                         "shared_bytes": 0} if codes
                         else {"state": "off"})
    assert answers[True]["method"] == "quantized" and answers[False]["method"] == "exhaustive"
    assert answers[True]["exhaustive"] and answers[True]["hits"] == answers[False]["hits"]
    assert answers[True]["set_radius"] == pytest.approx(answers[False]["set_radius"], rel=1e-9)


def test_stats_report_the_gpu_copy_and_the_rows_a_reload_shares(sample_folder, tiny_lipsim, tmp_path, monkeypatch):
    # torch's CPU device stands in for a GPU (tests/test_gpu_reload.py); a checkpoint appends a segment of one photo
    import torch

    import index.gallery
    import index.gpu_scan

    monkeypatch.setattr(index.gallery, "QUANTIZED_MIN", 0)
    folder = copy_photos(sample_folder, tmp_path / "photos", FIRST)
    opts = IngestOptions(workers=1, use_gpu=False, merge_tiers=False)
    build_index(folder, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=opts)
    real_gpu = index.gpu_scan.scan_device() is not None
    off = create_app(tmp_path / "index", ServeConfig(use_gpu=False), encoder=tiny_lipsim)
    none = create_app(tmp_path / "index", ServeConfig(), encoder=tiny_lipsim)
    none.state.holder.current()._codes_thread.join(60)
    monkeypatch.setattr(index.gpu_scan, "scan_device", lambda: torch.device("cpu"))
    app = create_app(tmp_path / "index", ServeConfig(), encoder=tiny_lipsim)

    def gpu_state(server):
        deadline = time.time() + 60
        while True:
            state = request(server.port, "GET", "/stats")[1]["serving"]["gpu"]
            if state["state"] != "copying" or time.time() > deadline:
                return state
            time.sleep(0.05)

    with ServerThread(off) as a, ServerThread(none) as b:
        assert gpu_state(a) == {"state": "off"}
        assert gpu_state(b) == {"state": "none"} or real_gpu  # (a machine where torch sees CUDA: "ready")
    with ServerThread(app) as server:
        n = len(app.state.holder.current())
        assert gpu_state(server) == {"state": "ready", "rows": n, "bytes": n * 33 * 4, "shared_rows": 0,
                                     "shared_bytes": 0}
        shutil.copy2(sample_folder / "grass.png", folder / "grass.png")
        update_index(tmp_path / "index", encoder=tiny_lipsim, options=opts)
        assert gpu_state(server) == {"state": "ready", "rows": n + 1, "bytes": (n + 1) * 33 * 4, "shared_rows": n,
                                     "shared_bytes": n * 33 * 4}
        status, body = post(server.port, "/search", [("id", str(int(app.state.holder.current().ids()[0]))),
                                                     ("k", "3")])
        assert status == 200 and body["method"] == "exhaustive" and body["exhaustive"], body
