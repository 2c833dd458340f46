"""`robret index build FOLDER|@files.txt|files.parquet` (index/sources.py): a list of files builds the
same index as the folder it lists, entries that cannot be indexed are reported with their reason, the
indexed root confines every read, `update` reads the list again, and file:// URIs are local paths."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from index import IngestOptions, build_index, update_index, verify_index

from _index_fixtures import assert_same_index as same_index, catalog_rows as rows, copy_photos, index_vectors as vectors

ROOT = Path(__file__).resolve().parents[1]
SPEC = "lipsim:cpu-tiny"
OPTS = dict(workers=1, batch_size=4, use_gpu=False)


@pytest.fixture(scope="module")
def gallery_folder(tmp_path_factory, sample_folder) -> Path:
    root = tmp_path_factory.mktemp("src") / "photos"
    copy_photos(sample_folder, root, ("astronaut", "brick", "camera"))
    copy_photos(sample_folder, root / "sub", ("coins", "moon"))
    (root / "readme.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folder_index(gallery_folder, tmp_path_factory, tiny_lipsim) -> Path:
    out = tmp_path_factory.mktemp("folder") / "index"
    build_index(gallery_folder, out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    return out


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png"))


def assert_same_index(a, b) -> None:
    assert len(rows(a)) == 5
    same_index(a, b)


def test_a_list_file_builds_the_same_index_as_the_folder(gallery_folder, folder_index, tmp_path, tiny_lipsim):
    listing = tmp_path / "files.txt"
    files = image_files(gallery_folder)
    # relative entries (to the list file's directory), an absolute one, a blank line and CRLF endings
    lines = [os.path.relpath(p, tmp_path) for p in files[:-1]] + ["", str(files[-1])]
    listing.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    out = tmp_path / "index"
    report = build_index(f"@{listing}", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert report.indexed == 5 and not report.failed
    assert report.root == str(gallery_folder)  # the deepest directory holding every listed file
    assert_same_index(folder_index, out)


def test_a_parquet_table_builds_the_same_index_as_the_folder(gallery_folder, folder_index, tmp_path, tiny_lipsim):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"path": [str(p) for p in image_files(gallery_folder)], "label": list(range(5))})
    pq.write_table(table, tmp_path / "files.parquet")
    out = tmp_path / "index"
    build_index(tmp_path / "files.parquet", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS),
                root=gallery_folder)
    assert_same_index(folder_index, out)


def test_file_uris_are_local_paths_for_a_folder_and_a_list(gallery_folder, folder_index, tmp_path, tiny_lipsim):
    out = tmp_path / "by-uri"
    build_index(gallery_folder.as_uri(), out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert_same_index(folder_index, out)
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(p.as_uri() + "\n" for p in image_files(gallery_folder)))
    out2 = tmp_path / "list-by-uri"
    build_index("@" + listing.as_uri(), out2, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS),
                root=gallery_folder.as_uri())
    assert_same_index(folder_index, out2)


def test_list_entries_outside_the_root_missing_or_not_files_are_reported_and_never_read(
        gallery_folder, tmp_path, tiny_lipsim, sample_folder):
    outside = copy_photos(sample_folder, tmp_path / "elsewhere", ("coffee",)) / "coffee.png"
    root = tmp_path / "root"
    copy_photos(sample_folder, root, ("astronaut", "brick"))
    (root / "sub").mkdir()
    (root / "escape.png").symlink_to(outside)
    (root / "notes.txt").write_text("hello")
    os.mkfifo(root / "fifo.png")
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join([
        "root/astronaut.png", str(outside), "root/../elsewhere/coffee.png", "root/missing.png", "root/sub",
        "root/escape.png", "root/notes.txt", "root/fifo.png", "root/brick.png", "root/astronaut.png",
        "s3://bucket/photo.png"]) + "\n")
    out = tmp_path / "index"
    report = build_index(f"@{listing}", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS), root=root)
    kinds = {path: reason.split(":", 1)[0] for path, reason in report.failed}
    assert kinds == {
        str(outside): "outside_root", "missing.png": "missing", "sub": "not_regular", "escape.png": "symlink_escape",
        "notes.txt": "not_image", "fifo.png": "not_regular", "s3://bucket/photo.png": "outside_root",
    }
    assert report.indexed == 2 and any("listed more than once" in w for w in report.warnings)
    indexed = {path for path, (_, status, *_) in rows(out).items() if status == "indexed"}
    assert indexed == {"astronaut.png", "brick.png"}
    # the file outside the root reached no row (no content hash of it anywhere in the catalog)
    from index.decode import hash_bytes

    assert hash_bytes(outside.read_bytes()) not in {r[3] for r in rows(out).values()}


def test_update_reads_the_list_again_and_removes_what_is_no_longer_listed(gallery_folder, tmp_path, tiny_lipsim,
                                                                         capsys):
    files = image_files(gallery_folder)
    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in files[:3]))
    out = tmp_path / "index"
    build_index(f"@{listing}", out, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS), root=gallery_folder)
    listing.write_text("".join(f"{p}\n" for p in files[1:]))  # first one dropped, two added
    report = update_index(out, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert (report.indexed, report.removed, report.unchanged, report.total) == (2, 1, 2, 4)
    status = {path: s for path, (_, s, *_) in rows(out).items()}
    assert status[os.path.relpath(files[0], gallery_folder)] == "removed"
    assert verify_index(out).ok
    from retrieval.cli import main

    assert main(["index", "stats", str(out)]) == 0  # the catalog records the list, and stats says so
    assert f"list       {listing} (list; read again at each update)" in capsys.readouterr().out
    before = rows(out)
    listing.unlink()
    with pytest.raises(FileNotFoundError, match="is gone; nothing was changed"):
        update_index(out, encoder=tiny_lipsim, options=IngestOptions(**OPTS))
    assert rows(out) == before and len(vectors(out)) == 4


def test_the_same_index_directory_refuses_another_source(gallery_folder, folder_index, tmp_path, tiny_lipsim):
    from index.errors import CatalogError

    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in image_files(gallery_folder)))
    with pytest.raises(CatalogError, match="indexes .*not .*files.txt"):
        build_index(f"@{listing}", folder_index, SPEC, encoder=tiny_lipsim, options=IngestOptions(**OPTS))


def _robret(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "retrieval.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("make_source,extra,message", [
    (lambda t: "s3://KEY:SECRET@bucket/photos", [], "URI with credentials or a port in its bucket name refused"),
    (lambda t: "s3://bucket/../photos", [], "cannot be an indexed root"),
    (lambda t: "hdfs://host/photos", [], "hdfs:// is not supported"),
    (lambda t: "@" + str(t / "absent.txt"), [], "does not exist"),
    (lambda t: _write(t / "spread.txt", "/etc/hosts.png\n/tmp/x.png\n"), [], "give the indexed root with --root"),
    (lambda t: _write(t / "empty.txt", "\n\n"), [], "names no file and no object"),
    (lambda t: str(t), ["--root", "/"], "--root is for a list of files"),
])
def test_cli_refuses_an_unusable_source_with_one_line_and_exit_2(tmp_path, make_source, extra, message, capsys):
    from retrieval.cli import main

    code = main(["index", "build", make_source(tmp_path), "--index-dir", str(tmp_path / "idx"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return "@" + str(path)


def test_cli_builds_from_a_list_and_reports_bad_entries_like_the_folder_does(gallery_folder, tmp_path):
    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in image_files(gallery_folder)[:2]) + "nope.png\n")
    proc = _robret("index", "build", f"@{listing}", "--root", str(gallery_folder), "--index-dir",
                   str(tmp_path / "idx"), "--encoder", SPEC, "--cpu", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "2 images indexed" in proc.stdout and f"from {gallery_folder}" in proc.stdout
    assert "outside_root: listed file lies outside the indexed root" in proc.stdout
