"""`robret weights`: fetch → verify → install → load, against a loopback HTTP server (no other network).

The server (http.server in a thread on 127.0.0.1, port 0) serves synthesised files in the upstream
formats under the registry's file names, as a mirror would (`--mirror URL`):
  lipsim-official-m0.5.pth              torch.save({'model_state_dict': … 'module.model.' keys …}) of the
                                        official network layout (tests/test_convert.py's reference). Its
                                        shape is smaller than the real `small` preset (one conv layer of
                                        10 channels, one dense layer of 16, at 224 px so that D = 1792 fits):
                                        the real 63M-parameter file would only slow the test down.
  dreamsim_clip_vitb32_checkpoint.zip   the release zip layout: the variant's files at the archive's top
                                        level (dreamsim unzips it into its cache directory), written by
                                        tests/_dreamsim_fixtures.py.
  dreamsim_dino_vitb16_checkpoint.zip,  dino_vitb16's release zip, the facebookresearch/dino repository as a
  facebookresearch_dino_main-….zip,     GitHub archive (one top folder `dino-<commit>/`; its hubconf.py is a
  dino_vitbase16_pretrain.pth           stand-in, see _dreamsim_fixtures.DINO_HUBCONF) and the backbone
                                        checkpoint that hubconf loads with torch.hub.load_state_dict_from_url.
It honours Range requests (resumption) and can drop a connection half-way through a file once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import socket
import threading
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import torch

from _dreamsim_fixtures import write_dino_cache, write_release_cache
from encoder import EncoderError, load_encoder
from encoder.checkpoint import read_header
from encoder.pretrained import LIPSIM_OFFICIAL, get_pretrained
from retrieval.cli import main
from tests.test_convert import TOL, _official, _reference_embedding, _save_official

LIPSIM = "lipsim:official-m0.5"
LIPSIM_FILE = "lipsim-official-m0.5.pth"
DREAMSIM = "dreamsim:clip_vitb32"
DREAMSIM_ZIP = "dreamsim_clip_vitb32_checkpoint.zip"


class _Mirror(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()  # names whose next response stops half-way
        self.ignore_range = False  # answer every request with the whole file (200), as some servers do
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/weights"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: _Mirror = self.server
        name = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        srv.requests.append((name, rng))
        if srv.ignore_range:
            rng = None
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in srv.drop_once:
            srv.drop_once.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection to a host other than 127.0.0.1 fails the test."""
    real = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] != "127.0.0.1":
            raise AssertionError(f"network access to {address} attempted")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def mirror(loopback_only, monkeypatch):
    monkeypatch.delenv("ROBRET_WEIGHTS_MIRROR", raising=False)
    srv = _Mirror()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    """(network, bytes of its official-format .pth) with D = 1792 (the official embed_dim)."""
    net = _official(depth=1, channels=10, depth_linear=1, n_features=16, n_classes=1792, input_size=224)
    path = tmp_path_factory.mktemp("official") / LIPSIM_FILE
    _save_official(net, path)
    return net, path.read_bytes()


@pytest.fixture(scope="module")
def release_zip(tmp_path_factory):
    """(unpacked release cache, bytes of the clip_vitb32 release zip with the same files at its top level)."""
    root = write_release_cache(tmp_path_factory.mktemp("release"), ("clip_vitb32",))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, p.relative_to(root).as_posix())
    return root, buf.getvalue()


def _tree(root: Path, skip: str | None = None) -> dict[str, str]:
    """Every file under `root` with its SHA-256 (the cache's state)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not (skip and p.relative_to(root).parts[0] == skip)}


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A weights cache root that already holds something (failures must leave it exactly as it was)."""
    root = tmp_path / "cache"
    (root / "dreamsim").mkdir(parents=True)
    (root / "dreamsim" / "notes.txt").write_text("kept")
    (root / "fetched.json").write_text("{}\n")
    monkeypatch.setenv("ROBRET_WEIGHTS_DIR", str(root))
    return root


def test_fetch_official_lipsim_through_mirror_converts_once_and_embeds_like_the_official_network(
        mirror, official_pth, cache, capsys):
    net, data = official_pth
    mirror.files[LIPSIM_FILE] = data
    rc, out, err = _run(capsys, "weights", "fetch", LIPSIM, "--mirror", mirror.url, "--quiet")
    assert rc == 0, err
    installed = cache / "lipsim" / "official-m0.5.safetensors"
    assert str(installed) in out
    prov = read_header(installed)["provenance"]
    assert prov["sha256_original"] == hashlib.sha256(data).hexdigest()
    assert prov["size_original"] == len(data)
    assert prov["source"] == f"{mirror.url}/{LIPSIM_FILE}"
    assert prov["drive_id"] == LIPSIM_OFFICIAL["official-m0.5"][0]
    assert not (cache / ".partial").exists() and not list(cache.rglob("*.pth"))  # only the converted file stays

    enc = load_encoder(LIPSIM)
    assert enc.name == LIPSIM and enc.pretrained and enc.dim == 1793 and enc.lipschitz == 1.0
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert (enc.embed(x) - _reference_embedding(net, x)).abs().max().item() <= TOL

    rc, out, _ = _run(capsys, "weights", "list", "--json")
    rows = {r["spec"]: r for r in json.loads(out)["downloadable"]}
    assert rows[LIPSIM]["cached"] and rows[LIPSIM]["path"] == str(installed)
    assert rows[LIPSIM]["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not rows["lipsim:official-m0.2"]["cached"]
    # a second fetch finds it installed and downloads nothing
    n = len(mirror.requests)
    assert _run(capsys, "weights", "fetch", LIPSIM, "--mirror", mirror.url, "--quiet")[0] == 0
    assert len(mirror.requests) == n


def test_missing_official_weights_name_the_fetch_command(cache):
    before = _tree(cache)
    with pytest.raises(EncoderError, match="robret weights fetch lipsim:official-m0.5$"):
        load_encoder(LIPSIM)
    assert _tree(cache) == before


def test_drive_download_goes_through_gdown_with_the_official_id(official_pth, cache, capsys, monkeypatch,
                                                                 loopback_only):
    import gdown

    monkeypatch.delenv("ROBRET_WEIGHTS_MIRROR", raising=False)
    _, data = official_pth
    calls = []

    def download(id=None, output=None, quiet=False, resume=False, **kwargs):
        calls.append({"id": id, "resume": resume, **kwargs})
        Path(output).write_bytes(data)  # what Drive serves for this id
        return output

    monkeypatch.setattr(gdown, "download", download)
    rc, _, err = _run(capsys, "weights", "fetch", LIPSIM, "--quiet")
    assert rc == 0, err
    assert calls == [{"id": "11JoY5jrm4qmk0QmncQ5eVqXQpXQNLG1X", "resume": True}]
    prov = read_header(cache / "lipsim" / "official-m0.5.safetensors")["provenance"]
    assert prov["source"] == "https://drive.google.com/uc?id=11JoY5jrm4qmk0QmncQ5eVqXQpXQNLG1X"


def test_fetch_dreamsim_release_zip_unpacks_and_loads(mirror, release_zip, cache, capsys):
    source_cache, data = release_zip
    mirror.files[DREAMSIM_ZIP] = data
    rc, out, err = _run(capsys, "weights", "fetch", DREAMSIM, "--mirror", mirror.url, "--quiet")
    assert rc == 0, err
    installed = cache / "dreamsim"
    assert _tree(installed) == {**_tree(source_cache), "notes.txt": _tree(installed)["notes.txt"]}
    manifest = json.loads((cache / "fetched.json").read_text())
    assert manifest[DREAMSIM_ZIP]["sha256"] == hashlib.sha256(data).hexdigest()
    enc = load_encoder(DREAMSIM)  # default directory: <weights root>/dreamsim
    ref = load_encoder(DREAMSIM, cache_dir=source_cache)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = enc.embed(x)
        assert e.shape == (1, 512) and torch.equal(e, ref.embed(x))


def _evil_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("clip_vitb32_pretrain.pth.tar", b"x")
        zf.writestr("../escaped.txt", b"outside")
        zf.writestr("/abs.txt", b"absolute")
    return buf.getvalue()


def _with_checks(monkeypatch, spec, **fields):
    """The registry entry of `spec` with a published size/SHA-256 (the real entries publish none)."""
    import encoder.fetch as fetch_mod

    entry = get_pretrained(spec)
    entry = dataclasses.replace(entry, files=(dataclasses.replace(entry.files[0], **fields),))
    monkeypatch.setattr(fetch_mod, "get_pretrained", lambda s: entry if s == spec else get_pretrained(s))


@pytest.mark.parametrize("case", ["sha256", "short", "html", "zip-slip", "not-a-zip", "wrong-archive",
                                  "missing-on-mirror"])
def test_failed_check_prints_one_line_and_leaves_the_cache_as_it_was(case, mirror, official_pth, cache, capsys,
                                                                     monkeypatch, tmp_path):
    _, data = official_pth
    spec, name, expect = LIPSIM, LIPSIM_FILE, None
    if case == "sha256":
        _with_checks(monkeypatch, LIPSIM, sha256="0" * 64)
        mirror.files[name], expect = data, "does not match the expected " + "0" * 64
    elif case == "short":
        _with_checks(monkeypatch, LIPSIM, size=len(data) + 100)
        mirror.files[name], expect = data, f"has {len(data)} bytes, expected {len(data) + 100}"
    elif case == "html":
        mirror.files[name] = b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head></html>"
        expect = "returned an HTML page"
    elif case == "zip-slip":
        spec, name, expect = DREAMSIM, DREAMSIM_ZIP, "refusing to unpack entry '../escaped.txt'"
        mirror.files[name] = _evil_zip()
    elif case == "missing-on-mirror":
        expect = f"cannot download {mirror.url}/{name} (HTTP 404"
    elif case == "not-a-zip":
        spec, name, expect = DREAMSIM, DREAMSIM_ZIP, "is not a zip archive"
        mirror.files[name] = bytes(range(256)) * 8
    else:  # a zip, but not the release archive (a torch.save file is a zip)
        spec, name, expect = DREAMSIM, DREAMSIM_ZIP, "lacks clip_vitb32_pretrain.pth.tar, clip_vitb32_single_lora"
        mirror.files[name] = data
    before = _tree(cache)
    rc, out, err = _run(capsys, "weights", "fetch", spec, "--mirror", mirror.url, "--quiet")
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and expect in err, err
    assert _tree(cache) == before and sorted(p.name for p in cache.iterdir()) == ["dreamsim", "fetched.json"]
    assert not (tmp_path / "escaped.txt").exists() and not (cache / "escaped.txt").exists()


@pytest.mark.parametrize("ranges", [True, False], ids=["resumes", "restarts-without-range-support"])
def test_dropped_connection_keeps_the_partial_file_and_the_next_fetch_resumes(ranges, mirror, official_pth, cache,
                                                                              capsys):
    net, data = official_pth
    mirror.files[LIPSIM_FILE] = data
    mirror.ignore_range = not ranges
    mirror.drop_once.add(LIPSIM_FILE)
    before = _tree(cache)
    rc, _, err = _run(capsys, "weights", "fetch", LIPSIM, "--mirror", mirror.url, "--quiet")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert f"dropped after {len(data) // 2} of {len(data)} bytes" in err and "again to resume" in err
    assert _tree(cache, skip=".partial") == before
    assert (cache / ".partial" / LIPSIM_FILE).stat().st_size == len(data) // 2

    rc, _, err = _run(capsys, "weights", "fetch", LIPSIM, "--mirror", mirror.url, "--quiet")
    assert rc == 0, err
    assert mirror.requests[-1] == (LIPSIM_FILE, f"bytes={len(data) // 2}-")  # answered with 206, or 200 + restart
    prov = read_header(cache / "lipsim" / "official-m0.5.safetensors")["provenance"]
    assert prov["sha256_original"] == hashlib.sha256(data).hexdigest()
    assert not (cache / ".partial").exists()


def test_connection_refused_names_the_url_and_weights_import(cache, capsys, loopback_only):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = _tree(cache)
    rc, _, err = _run(capsys, "weights", "fetch", LIPSIM, "--mirror", f"http://127.0.0.1:{port}/w", "--quiet")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert f"http://127.0.0.1:{port}/w/{LIPSIM_FILE}" in err and f"robret weights import {LIPSIM} FILE" in err
    assert _tree(cache) == before and not (cache / ".partial").exists()


def test_import_installs_a_file_obtained_elsewhere_with_the_same_checks(official_pth, cache, capsys, tmp_path):
    net, data = official_pth
    html = tmp_path / "download.pth"
    html.write_bytes(b"<html><body>Sign in</body></html>")
    before = _tree(cache)
    rc, _, err = _run(capsys, "weights", "import", LIPSIM, str(html))
    assert rc == 1 and "HTML page" in err and _tree(cache) == before
    other = tmp_path / "wrong.pth"  # a real checkpoint of something else: said once, naming the file given
    torch.save({"model_state_dict": {"conv.weight": torch.zeros(2)}}, other)
    rc, _, err = _run(capsys, "weights", "import", LIPSIM, str(other))
    assert rc == 1 and _tree(cache) == before
    assert err.count("not an official LipSim checkpoint") == 1 and str(other) in err, err
    good = tmp_path / "lipsim_from_a_browser.pth"
    good.write_bytes(data)
    rc, out, err = _run(capsys, "weights", "import", LIPSIM, str(good))
    assert rc == 0, err
    x = torch.rand(1, 3, 224, 224)
    assert (load_encoder(LIPSIM).embed(x) - _reference_embedding(net, x)).abs().max().item() <= TOL


def test_list_marks_random_presets_apart_and_lists_every_dreamsim_variant_with_its_source(cache, capsys):
    from dreamsim.config import dreamsim_args, dreamsim_weights

    rc, out, _ = _run(capsys, "weights", "list", "--json")
    rows = json.loads(out)
    assert rows["cache_root"] == str(cache)
    down = {r["spec"]: r for r in rows["downloadable"]}
    assert {f"dreamsim:{v}" for v in dreamsim_weights} | {f"lipsim:{t}" for t in LIPSIM_OFFICIAL} == set(down)
    for v, url in dreamsim_weights.items():
        assert down[f"dreamsim:{v}"]["files"][0]["source"] == url
        uses_hub = "dino" in dreamsim_args["model_config"][v.removesuffix("_patch")]["model_type"]
        assert down[f"dreamsim:{v}"]["contains_code"] == uses_hub == (v in ("ensemble",) or "dino" in v)
    presets = {r["spec"] for r in rows["random_weight_presets"]}
    assert "lipsim:small" in presets and not presets & set(down)
    assert "lipsim:demo" in {r["spec"] for r in rows["bundled"]} and "lipsim:demo" not in presets


def _zip_dir(root: Path, names, top: str = "") -> bytes:
    """A zip of root/<name> (files and folders) for each name, under `top`/ when given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            for p in sorted([root / name, *(root / name).rglob("*")]):
                if p.is_file():
                    zf.write(p, (PurePosixPath(top) / p.relative_to(root).as_posix()).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="module")
def dino_sources(tmp_path_factory):
    """(dreamsim cache for dino_vitb16, {mirror file name: bytes}) in the upstream layouts."""
    root = write_dino_cache(tmp_path_factory.mktemp("dino"))
    entry = get_pretrained("dreamsim:dino_vitb16")
    release, archive, backbone = entry.files
    files = {
        release.name: _zip_dir(root, ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"]),
        archive.name: _zip_dir(root / "facebookresearch_dino_main", ["hubconf.py"], top=f"dino-{archive.commit}"),
        backbone.name: (root / backbone.install_as).read_bytes(),
    }
    return root, files


def test_fetch_dino_variant_installs_pinned_hub_repository_and_backbone_and_loads_offline(
        mirror, dino_sources, cache, capsys):
    source_cache, files = dino_sources
    release, archive, backbone = get_pretrained("dreamsim:dino_vitb16").files
    assert archive.contains_code and archive.url == f"https://github.com/facebookresearch/dino/archive/{archive.commit}.zip"
    before = _tree(cache)
    with pytest.raises(EncoderError, match="robret weights fetch dreamsim:dino_vitb16"):
        load_encoder("dreamsim:dino_vitb16")  # loading never fetches, and writes no code
    assert _tree(cache) == before

    # first attempt: the repository archive tries to escape its folder; nothing is installed
    mirror.files.update(files)
    mirror.files[archive.name] = _evil_zip()
    rc, _, err = _run(capsys, "weights", "fetch", "dreamsim:dino_vitb16", "--mirror", mirror.url, "--quiet")
    assert rc == 1 and "refusing to unpack" in err and _tree(cache, skip=".partial") == before
    # second attempt: the release zip already downloaded is not downloaded again
    mirror.files.update(files)
    mirror.requests.clear()
    rc, _, err = _run(capsys, "weights", "fetch", "dreamsim:dino_vitb16", "--mirror", mirror.url, "--quiet")
    assert rc == 0, err
    assert mirror.requests[0] == (release.name, f"bytes={len(files[release.name])}-")  # answered 416: complete
    dreamsim_dir = cache / "dreamsim"
    assert (dreamsim_dir / "facebookresearch_dino_main" / "hubconf.py").read_bytes() == \
        (source_cache / "facebookresearch_dino_main" / "hubconf.py").read_bytes()
    assert (dreamsim_dir / backbone.install_as).read_bytes() == files[backbone.name]
    assert not (cache / ".partial").exists()

    rc, out, _ = _run(capsys, "weights", "list", "--json")
    row = next(r for r in json.loads(out)["downloadable"] if r["spec"] == "dreamsim:dino_vitb16")
    assert row["cached"] and row["contains_code"] and row["files"][1]["commit"] == archive.commit
    assert row["files"][1]["sha256"] == hashlib.sha256(files[archive.name]).hexdigest()  # recorded at fetch
    # a file lost from the cache: only that one is downloaded again
    (dreamsim_dir / backbone.install_as).unlink()
    mirror.requests.clear()
    assert _run(capsys, "weights", "fetch", "dreamsim:dino_vitb16", "--mirror", mirror.url, "--quiet")[0] == 0
    assert mirror.requests == [(backbone.name, None)]

    enc = load_encoder("dreamsim:dino_vitb16")
    ref = load_encoder("dreamsim:dino_vitb16", cache_dir=source_cache)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        e = enc.embed(x)
        assert e.shape == (1, 768) and torch.equal(e, ref.embed(x))
