"""Download, verify and install the weights of encoder.pretrained — only ever on an explicit call.

    fetch("lipsim:official-m0.5")                  # Google Drive through gdown, or the mirror
    fetch("dreamsim:clip_vitb32", mirror="http://mirror.internal/robret/")
    import_weights("lipsim:official-m0.5", "~/Downloads/lipsim.pth")

A fetch first downloads every file of the entry into <root>/.partial/<name> (resumed with an HTTP
Range request when a previous attempt was cut off), checks each one (size and SHA-256 where known,
not an HTML page, the right container: zip or torch.save), and only then installs them:
  lipsim    the official .pth is converted (encoder.convert, no unpickling of code) and written as
            <root>/lipsim/<tag>.safetensors with its provenance (source, Drive id, SHA-256 of the .pth)
  dreamsim  zips are unpacked into <root>/dreamsim (every entry checked first: no absolute paths, no
            `..`, no links) through a staging folder, then renamed into place; other files are
            written with encoder.io.atomic_write.
A failed check removes the downloaded file and leaves the installed cache as it was; an interrupted
download is kept in .partial so that the next fetch resumes it. Every verified download's SHA-256
and size are recorded in <root>/fetched.json (shown by `robret weights list` where upstream
publishes none). `--mirror URL` / $ROBRET_WEIGHTS_MIRROR fetch URL/<file name> instead of the
upstream source (air-gapped sites, CI).
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import gdown
from tqdm import tqdm

from .checkpoint import save_lipsim
from .convert import load_official
from .installed import _MANIFEST, WeightStatus, _installed, _manifest, install_path, weight_status
from .io import atomic_write, atomic_write_text, file_sha256
from .pretrained import (ENV_MIRROR, PretrainedWeights, RemoteFile, dreamsim_required_files, get_pretrained,
                         weights_root)
from .protocol import EncoderError

__all__ = ["WeightsError", "WeightStatus", "fetch", "import_weights", "weight_status", "install_path"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_PARTIAL = ".partial"


class WeightsError(EncoderError):
    """A download or an imported file failed; the message is one line that says what to do."""


# --- download -------------------------------------------------------------------------------------

def _mirror_url(mirror: str, f: RemoteFile) -> str:
    return f"{mirror.rstrip('/')}/{f.name}"


def _unreachable(spec: str, url: str, why: object) -> WeightsError:
    return WeightsError(f"cannot download {url} ({why}); download it by other means and install it with "
                        f"`robret weights import {spec} FILE`")


def _http_download(spec: str, url: str, part: Path, progress: bool, restarted: bool = False) -> None:
    """Append `url` to `part`, resuming from its current size with a Range request when it exists."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "robret-weights"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # "bytes */N": nothing after byte `have`
            if (exc.headers.get("Content-Range") or "").endswith(f"/{have}"):
                return  # the partial file is already complete (a later file of a previous attempt failed)
            if not restarted:
                part.unlink()
                return _http_download(spec, url, part, progress, restarted=True)
        raise _unreachable(spec, url, f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(spec, url, getattr(exc, "reason", exc)) from exc
    with resp:
        content_range = resp.headers.get("Content-Range") or ""
        if have and (resp.status != 206 or not content_range.startswith(f"bytes {have}-")):
            # the server ignored the Range request (or answered another one): restart from 0
            log.info("%s does not resume downloads; restarting %s", url, part.name)
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        got = have
        try:
            with open(part, "ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
            raise WeightsError(f"connection to {url} dropped after {got} bytes ({exc}); run the same fetch again "
                               f"to resume") from exc
    if total is not None and got < total:
        raise WeightsError(f"connection to {url} dropped after {got} of {total} bytes; run the same fetch again "
                           "to resume")


def _drive_download(spec: str, f: RemoteFile, part: Path, progress: bool) -> None:
    """Google Drive through gdown (it handles Drive's confirmation page and its resumption)."""
    try:
        out = gdown.download(id=f.drive_id, output=str(part), quiet=not progress, resume=True)
    except Exception as exc:  # gdown raises its own types (FileURLRetrievalError) and requests' ones
        raise _unreachable(spec, f.source, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if out is None or not part.is_file():
        raise _unreachable(spec, f.source, "gdown returned no file")


# --- checks ---------------------------------------------------------------------------------------

def _sniff(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(512)


def _zip_expects(spec: str, f: RemoteFile) -> tuple[str, ...]:
    """Top-level names an archive must hold: a repository's hubconf.py, a release zip's files (from dreamsim)."""
    if f.strip_top:
        return ("hubconf.py",)
    return dreamsim_required_files()[spec.partition(":")[2]]


def _member_path(f: RemoteFile, rel: PurePosixPath) -> PurePosixPath:
    """Where an archive entry goes, relative to the folder it is unpacked into."""
    return PurePosixPath(*rel.parts[1:]) if f.strip_top else rel


def _check_file(spec: str, f: RemoteFile, path: Path, source: str) -> str:
    """Raise WeightsError unless `path` is what `f` describes; return its SHA-256.

    Zips: every entry checked (no absolute path, `..` or link) and the expected content present."""
    head = _sniff(path)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:200]:
        raise WeightsError(f"{source} returned an HTML page instead of {f.name} (Google Drive does this when its "
                           f"download quota is exceeded): try later, or download it in a browser and run "
                           f"`robret weights import {spec} FILE`")
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        raise WeightsError(f"{f.name} from {source} has {size} bytes, expected {f.size} (short or wrong file)")
    digest = file_sha256(path)
    if f.sha256 is not None and digest != f.sha256:
        raise WeightsError(f"{f.name} from {source}: SHA-256 {digest} does not match the expected {f.sha256}")
    is_zip = head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path)
    if f.kind == "zip" and not is_zip:
        raise WeightsError(f"{f.name} from {source} is not a zip archive")
    if f.kind == "zip":
        with zipfile.ZipFile(path) as zf:
            names = {_member_path(f, rel).parts[0] for _, rel in _safe_members(path, zf) if _member_path(f, rel).parts}
        lacking = [name for name in _zip_expects(spec, f) if name not in names]
        if lacking:
            raise WeightsError(f"{f.name} from {source} lacks {', '.join(lacking)} (not the archive {spec} needs)")
    if f.kind == "torch" and not (is_zip or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise WeightsError(f"{f.name} from {source} is not a PyTorch checkpoint")
    return digest


def _safe_members(archive: Path, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Every entry with its relative path; WeightsError on absolute paths, `..`, drive letters or links."""
    members = []
    for info in zf.infolist():
        name = info.filename
        rel = PurePosixPath(name)
        mode = info.external_attr >> 16
        if (name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name) or ".." in rel.parts
                or stat.S_ISLNK(mode)):
            raise WeightsError(f"{archive.name}: refusing to unpack entry {name!r} (absolute path, '..' or link "
                               "pointing outside the target folder)")
        members.append((info, rel))
    return members


# --- install --------------------------------------------------------------------------------------

def _replace_tree(src: Path, dst: Path) -> None:
    """Move `src` (file or folder) to `dst`, replacing what is there (a folder is swapped, then removed)."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def _unpack(f: RemoteFile, archive: Path, dest: Path) -> None:
    """Unpack `archive` (checked by _check_file) into `dest` through a staging folder, then rename into place."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{f.name}.unpack-"))
    try:
        with zipfile.ZipFile(archive) as zf:
            for info, rel in _safe_members(archive, zf):
                rel = _member_path(f, rel)
                if not rel.parts:
                    continue
                target = staging.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
        if f.strip_top:
            os.chmod(staging, 0o755)  # mkdtemp makes it private; it becomes the repository folder
            _replace_tree(staging, dest / f.install_as)
            staging = None
        else:
            for item in sorted(staging.iterdir()):
                _replace_tree(item, dest / item.name)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)


def _install(entry: PretrainedWeights, f: RemoteFile, path: Path, root: Path, provenance: dict) -> None:
    dest = install_path(entry, root)
    if entry.family == "lipsim":
        try:
            enc = load_official(path, freeze=False)
        except EncoderError as exc:
            reason = str(exc).splitlines()[0]  # (it names the file and says what is wrong; a staged copy's path)
            raise WeightsError(f"{provenance['source']}: {reason.replace(str(path), 'the file')}") from exc
        save_lipsim(enc, dest, preset=enc.metadata.get("preset", "custom"), provenance=provenance)
    elif f.kind == "zip":
        _unpack(f, path, dest)
    else:
        atomic_write(dest / f.install_as, lambda tmp: shutil.copyfile(path, tmp))


def _record(root: Path, done: dict[str, dict]) -> None:
    manifest = {**_manifest(root), **done}
    atomic_write_text(root / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _needed(entry: PretrainedWeights, root: Path) -> list[RemoteFile]:
    """The files of `entry` not yet installed (a DINO backbone shared by several variants is fetched once)."""
    if _installed(entry, root):
        return []
    if entry.family == "lipsim":
        return list(entry.files)
    have = install_path(entry, root)
    needed = []
    for f in entry.files:
        if f.kind == "zip" and f.strip_top:
            present = (have / f.install_as / "hubconf.py").is_file()
        elif f.kind == "zip":  # the release zip
            present = all((have / name).exists() for name in dreamsim_required_files()[entry.spec.partition(":")[2]])
        else:
            present = (have / f.install_as).is_file()
        if not present:
            needed.append(f)
    return needed


def _install_all(entry: PretrainedWeights, files: list[tuple[RemoteFile, Path, str, str]], root: Path) -> Path:
    done = {}
    for f, path, source, digest in files:
        provenance = {"spec": entry.spec, "source": source, "file": f.name, "sha256_original": digest,
                      "size_original": path.stat().st_size, "drive_id": f.drive_id, "upstream": f.source,
                      "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _install(entry, f, path, root, provenance)
        done[f.name] = {k: provenance[k] for k in ("sha256_original", "size_original", "source", "installed")}
        done[f.name]["sha256"] = done[f.name].pop("sha256_original")
        done[f.name]["size"] = done[f.name].pop("size_original")
    _record(root, done)
    return install_path(entry, root)


def fetch(spec: str, cache_dir: str | os.PathLike | None = None, mirror: str | None = None,
          progress: bool = False, force: bool = False) -> Path:
    """Download, check and install the weights of `spec` (encoder.pretrained); return the installed path.

    Files already installed are skipped unless `force`. `mirror` (else $ROBRET_WEIGHTS_MIRROR) replaces
    every upstream source by <mirror>/<file name>. Raises WeightsError (one line) on any failure,
    leaving the installed cache as it was.
    """
    entry = get_pretrained(spec)
    root = weights_root(cache_dir)[0]
    mirror = mirror or os.environ.get(ENV_MIRROR) or None
    files = list(entry.files) if force else _needed(entry, root)
    partial = root / _PARTIAL
    ready = []
    try:
        for f in files:
            partial.mkdir(parents=True, exist_ok=True)
            part = partial / f.name
            source = _mirror_url(mirror, f) if mirror else f.source
            log.info("fetching %s from %s", f.name, source)
            if mirror or f.url:
                _http_download(spec, source, part, progress)
            else:
                _drive_download(spec, f, part, progress)
            try:
                digest = _check_file(spec, f, part, source)
            except WeightsError:
                part.unlink(missing_ok=True)  # complete but wrong: nothing to resume
                raise
            ready.append((f, part, source, digest))
        try:
            path = _install_all(entry, ready, root)
        except WeightsError:
            for _, part, _, _ in ready:
                part.unlink(missing_ok=True)
            raise
        for _, part, _, _ in ready:
            part.unlink(missing_ok=True)
        return path
    finally:
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()


def import_weights(spec: str, source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Install `spec` from files obtained elsewhere, with the checks of `fetch`.

    `source` is a file (an entry with one file takes any name; otherwise the name must be one of the
    entry's file names) or a folder holding the entry's files under their names.
    """
    entry = get_pretrained(spec)
    root = weights_root(cache_dir)[0]
    source = Path(source).expanduser()
    by_name = {f.name: f for f in entry.files}
    if source.is_dir():
        found = [(by_name[p.name], p) for p in sorted(source.iterdir()) if p.name in by_name]
        if not found:
            raise WeightsError(f"{source} holds none of {', '.join(by_name)}")
    elif source.is_file():
        if len(entry.files) == 1:
            found = [(entry.files[0], source)]
        elif source.name in by_name:
            found = [(by_name[source.name], source)]
        else:
            raise WeightsError(f"{source.name} is none of the files of {spec}: {', '.join(by_name)}")
    else:
        raise WeightsError(f"{source}: no such file or folder")
    ready = [(f, p, str(p.resolve()), _check_file(spec, f, p, str(p))) for f, p in found]
    path = _install_all(entry, ready, root)
    if not _installed(entry, root):
        missing = [f.name for f in _needed(entry, root)]
        log.warning("%s still lacks %s", spec, ", ".join(missing))
    return path
