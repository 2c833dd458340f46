"""`robret query` in bulk (files, folders, @lists, --id), its output formats, --exclude-self, readable
certificates, `robret index export`, and the one --index-dir convention of the index subcommands."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index import Gallery
from retrieval.cli import main
from retrieval.schema import SCHEMA_VERSION
from retrieval.search import search_embedding, search_image

ROOT = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _query_json(capsys, index_dir, *args) -> tuple[int, dict]:
    code, out, _ = _run(capsys, "query", *args, "--index-dir", index_dir, "--json")
    return code, json.loads(out)


def _ids_by_name(g: Gallery) -> dict[str, int]:
    return {g.path(int(i)).name: int(i) for i in g.ids()}


def test_a_folder_in_bulk_gives_exactly_the_one_by_one_results(photo_index, tiny_lipsim, capsys):
    folder, index_dir = photo_index
    files = sorted(p for p in folder.iterdir())
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        singles = [search_image(g, path, k=3, eps=0.01).to_dict() for path in files]
    for batch, exact in (("1", True), ("5", False)):
        code, doc = _query_json(capsys, index_dir, folder, "-k", "3", "--certify-eps", "0.01", "--batch-size", batch)
        assert code == 0 and doc["schema"] == SCHEMA_VERSION
        assert doc["summary"] == {"queries": len(files), "failed": 0, "failures": {}}
        assert [r["query"]["path"] for r in doc["results"]] == [str(p) for p in files]
        for record, one in zip(doc["results"], singles):
            assert record["schema"] == SCHEMA_VERSION and record["encoder"] == "lipsim:cpu-tiny"
            assert [h["id"] for h in record["hits"]] == [h["id"] for h in one["hits"]]
            # A batch of 5 embeds in float32 a little differently from a batch of 1: both are within the encoder's
            # float error ε of the exact embedding, which moves a margin by ≤ 2ε‖e_i − e_j‖ ≤ slack, a radius by
            # ≤ slack / (L·input_norm).
            tol = dict(rel=1e-12) if exact else dict(abs=record["slack"] / record["input_norm"])
            assert [h["radius"] for h in record["hits"]] == pytest.approx([h["radius"] for h in one["hits"]], **tol)
            assert record["set_radius"] == pytest.approx(one["set_radius"], **tol)
            assert record["query_size"] == one["query_size"] and record["values"] == one["values"]


def test_exclude_self_drops_the_gallery_copy_of_the_query_and_stays_certified(photo_index, tiny_lipsim, capsys):
    folder, index_dir = photo_index
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        me = _ids_by_name(g)["moon.png"]
        full = search_image(g, folder / "moon.png", k=4)
        without = search_image(g, folder / "moon.png", k=3, exclude=[me])
        digest = g.records([me])[0].content_hash
    assert full.hits[0].id == me  # without the option the query finds itself first
    code, doc = _query_json(capsys, index_dir, folder / "moon.png", "-k", "3", "--exclude-self")
    assert code == 0 and me not in [h["id"] for h in doc["hits"]]
    assert [h["id"] for h in doc["hits"]] == [h.id for h in full.hits[1:4]] == [h.id for h in without.hits]
    assert doc["set_radius"] == pytest.approx(without.set_radius, rel=1e-9) and doc["set_radius"] > 0
    assert doc["query"]["sha256"] == digest


def test_exclude_self_matches_by_content_not_by_name(photo_index, tiny_lipsim, tmp_path, capsys):
    folder, index_dir = photo_index
    copy = tmp_path / "renamed-elsewhere.png"
    shutil.copy(folder / "coins.png", copy)
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        coins = _ids_by_name(g)["coins.png"]
    code, doc = _query_json(capsys, index_dir, copy, "-k", "2", "--exclude-self")
    assert code == 0 and coins not in [h["id"] for h in doc["hits"]]
    code, doc = _query_json(capsys, index_dir, copy, "-k", "2")
    assert doc["hits"][0]["id"] == coins


def test_query_by_id_uses_the_stored_vector_without_reading_the_file(photo_index, tiny_lipsim, tmp_path, capsys):
    folder, index_dir = photo_index
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        target = _ids_by_name(g)["chelsea.png"]
        expected = search_embedding(g, g.vectors([target])[0], k=3)
        expected_without = search_embedding(g, g.vectors([target])[0], k=3, exclude=[target])
        side = g.encoder_info["input_size"]
    # The file is gone: an id query must not need it.
    moved = tmp_path / "chelsea.png"
    shutil.move(folder / "chelsea.png", moved)
    try:
        code, doc = _query_json(capsys, index_dir, "--id", target, "-k", "3")
        code2, doc2 = _query_json(capsys, index_dir, "--id", target, "-k", "3", "--exclude-self")
    finally:
        shutil.move(moved, folder / "chelsea.png")
    assert code == 0 and doc["query"]["id"] == target and doc["hits"][0]["id"] == target
    assert [h["id"] for h in doc["hits"]] == [h.id for h in expected.hits]
    assert doc["set_radius"] == pytest.approx(expected.set_radius, rel=1e-9)
    assert doc["radius_space"] == f"encoder input {side}×{side}" and doc["values"] == 3 * side * side
    assert doc["set_radius_rms255"] == pytest.approx(expected.set_radius / math.sqrt(3 * side * side) * 255)
    assert code2 == 0 and [h["id"] for h in doc2["hits"]] == [h.id for h in expected_without.hits]
    code, doc = _query_json(capsys, index_dir, "--id", "987654321")
    assert code == 1 and doc["error"]["kind"] == "unknown_id"


def test_bad_files_are_reported_per_record_and_the_batch_goes_on(photo_index, tmp_path, capsys):
    folder, index_dir = photo_index
    bad = tmp_path / "queries"
    bad.mkdir()
    shutil.copy(folder / "brick.png", bad / "a-good.png")
    (bad / "b-text.png").write_text("not an image\n")
    (bad / "c-empty.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image name: not a query")
    code, out, err = _run(capsys, "query", bad, tmp_path / "missing.png", "--index-dir", index_dir, "-k", "2", "--jsonl")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(records) == 4
    assert [r["query"]["source"].rsplit("/", 1)[-1] for r in records] == ["a-good.png", "b-text.png", "c-empty.jpg",
                                                                         "missing.png"]
    assert records[0]["hits"][0]["path"] == str(folder / "brick.png")
    assert [r["error"]["kind"] for r in records[1:]] == ["text", "empty", "missing"]
    assert all(r["schema"] == SCHEMA_VERSION for r in records)
    assert "3 of 4 queries failed" in err and "b-text.png: text" in err


def test_list_file_csv_and_paths_only_relative(photo_index, tmp_path, capsys, monkeypatch):
    folder, index_dir = photo_index
    listing = tmp_path / "todo.txt"
    listing.write_text(f"# queries\n{folder / 'coffee.png'}\n\n{folder / 'rocket.png'}\n")
    code, out, _ = _run(capsys, "query", f"@{listing}", "--index-dir", index_dir, "-k", "3", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 6 and rows[0]["query"].endswith("coffee.png")
    code, doc = _query_json(capsys, index_dir, f"@{listing}", "-k", "3")
    hits = [h for r in doc["results"] for h in r["hits"]]
    assert [int(r["id"]) for r in rows] == [h["id"] for h in hits]
    assert [float(r["radius"]) for r in rows] == pytest.approx([h["radius"] for h in hits], rel=1e-12)
    assert [float(r["radius_rms255"]) for r in rows] == pytest.approx([h["radius_rms255"] for h in hits], rel=1e-12)
    code, out, _ = _run(capsys, "query", f"@{listing}", "--index-dir", index_dir, "-k", "3", "--paths-only",
                        "--relative")
    assert code == 0 and out.splitlines() == [os.path.relpath(h["path"], folder) for h in hits]
    assert all(not line.startswith("/") for line in out.splitlines())
    code, out, err = _run(capsys, "query", f"@{tmp_path / 'absent.txt'}", "--index-dir", index_dir)
    assert code == 2 and "cannot read the list of files" in err and "absent.txt" in err


def test_a_list_names_files_and_lists_relative_to_its_own_folder_and_may_not_name_itself(photo_index, tmp_path,
                                                                                         capsys, monkeypatch):
    folder, index_dir = photo_index
    lists = tmp_path / "lists"
    (lists / "more").mkdir(parents=True)
    shutil.copy(folder / "coffee.png", lists / "coffee.png")
    shutil.copy(folder / "rocket.png", lists / "more" / "rocket.png")
    (lists / "more" / "inner.txt").write_text("rocket.png\n")
    (lists / "outer.txt").write_text("# relative to this list's folder, as `robret index build @LIST` reads them\n"
                                     "coffee.png\n@more/inner.txt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # (not the list's folder)
    code, doc = _query_json(capsys, index_dir, f"@{lists / 'outer.txt'}", "-k", "1")
    assert code == 0 and doc["summary"]["failed"] == 0
    assert [r["query"]["path"] for r in doc["results"]] == [str(lists / "coffee.png"), str(lists / "more" / "rocket.png")]
    assert [Path(r["hits"][0]["path"]).name for r in doc["results"]] == ["coffee.png", "rocket.png"]
    (lists / "more" / "inner.txt").write_text("rocket.png\n@../outer.txt\n")  # a cycle through two lists
    code, out, err = _run(capsys, "query", f"@{lists / 'outer.txt'}", "--index-dir", index_dir)
    assert code == 2 and "names itself" in err and "Traceback" not in err and out == ""


def test_a_query_file_that_does_not_exist_and_a_folder_without_images_are_said_plainly(photo_index, tmp_path, capsys):
    _, index_dir = photo_index
    code, doc = _query_json(capsys, index_dir, tmp_path / "never-there.png", tmp_path / "also-not.png")
    assert code == 1 and [r["error"] for r in doc["results"]] == [{"kind": "missing", "detail": "no such file"}] * 2
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, out, err = _run(capsys, "query", empty, "--index-dir", index_dir, "--json")
    assert code == 2 and out == "" and f"no image files in {empty}" in err


def test_an_id_beyond_64_bits_is_an_unknown_id(photo_index, capsys):
    _, index_dir = photo_index
    code, doc = _query_json(capsys, index_dir, "--id", str(10 ** 20))
    assert code == 1 and doc["error"]["kind"] == "unknown_id"


def test_a_hit_whose_name_is_not_utf8_is_written_escaped_in_json(tmp_path, sample_folder, tiny_lipsim, capsys):
    from index import IngestOptions, build_index

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample_folder / "coffee.png", photos / "coffee.png")
    shutil.copy(sample_folder / "rocket.png", os.path.join(os.fsencode(photos), b"caf\xe9.png"))
    build_index(photos, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    code, out, _ = _run(capsys, "query", sample_folder / "rocket.png", "--index-dir", tmp_path / "index", "--json",
                        "-k", "2")
    doc = json.loads(out)
    assert code == 0 and doc["hits"][0]["path"] == str(photos) + "/caf\\xe9.png"
    out.encode("utf-8")  # (a lone surrogate would not encode)
    assert "\\udc" not in out


def test_names_not_utf8_or_holding_a_newline_print_on_a_strict_utf8_stdout(tmp_path, sample_folder, tiny_lipsim,
                                                                           monkeypatch):
    """On a strict UTF-8 stdout (a locale such as en_US.UTF-8) a Latin-1 name made the table, CSV and --paths-only
    fail at the first such hit ("surrogates not allowed", exit 1); names now come out as the file system holds them,
    and --print0 ends each with a NUL so that a name holding a newline stays one path."""
    from index import IngestOptions, build_index

    photos = tmp_path / "photos"
    photos.mkdir()
    names = [b"caf\xe9.png", b"two\nlines.png", b"rocket.png"]
    for name in names:
        shutil.copy(sample_folder / "rocket.png", os.path.join(os.fsencode(photos), name))
    build_index(photos, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    query = ["query", str(sample_folder / "rocket.png"), "--index-dir", str(tmp_path / "index"), "-k", "3"]

    def run(*flags) -> tuple[int, bytes]:
        raw = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="\n"))
        code = main(query + list(flags))
        sys.stdout.flush()
        return code, raw.getvalue()

    expected = sorted(os.fsencode(photos) + b"/" + n for n in names)
    code, out = run("--print0")
    assert code == 0 and out.endswith(b"\0") and sorted(out[:-1].split(b"\0")) == expected
    code, out = run("--paths-only")
    assert code == 0 and os.fsencode(photos) + b"/caf\xe9.png\n" in out and out.count(b"\n") == 4
    code, out = run()
    assert code == 0 and b"caf\xe9.png" in out and b"rank" in out
    code, out = run("--csv")
    rows = list(csv.reader(io.StringIO(out.decode("utf-8", "surrogateescape"), newline="")))
    assert code == 0 and sorted(os.fsencode(r[7]) for r in rows[1:]) == expected
    code, out = run("--print0", "--relative")
    assert code == 0 and sorted(out[:-1].split(b"\0")) == sorted(names)


def test_jsonl_streams_each_record_before_the_process_ends(photo_index, tmp_path):
    folder, index_dir = photo_index
    listing = tmp_path / "many.txt"
    listing.write_text("\n".join(str(folder / "moon.png") for _ in range(60)) + "\n")  # 60 × ~2.5 kB ≫ a pipe's 64 KiB
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "query", f"@{listing}", "--index-dir",
                             str(index_dir), "-k", "10", "--jsonl", "--batch-size", "1", "--cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        # Not finished: 60 records do not fit in the pipe, so the first one arrived while it ran.
        assert proc.poll() is None
        assert first["schema"] == SCHEMA_VERSION and first["hits"][0]["path"] == str(folder / "moon.png")
        rest = proc.stdout.read().splitlines()
        assert proc.wait(timeout=120) == 0 and len(rest) == 59
        assert json.loads(rest[-1])["hits"] == first["hits"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_text_output_states_each_radius_as_l2_and_as_rms_grey_levels(photo_index, tiny_lipsim, capsys):
    folder, index_dir = photo_index
    code, out, _ = _run(capsys, "query", folder / "coffee.png", "--index-dir", index_dir, "-k", "2")
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        res = search_image(g, folder / "coffee.png", k=2)
    h, w = res.query_size
    assert code == 0 and res.values == 3 * h * w  # coffee.png is RGB
    rms = res.set_radius / math.sqrt(3 * h * w) * 255
    assert f"top-2 set certified for ‖δ‖₂ < {res.set_radius:.4g} = {rms:.4g}/255 RMS" in out
    assert f"ℓ2/√{3 * h * w}·255" in out and "radius ℓ2" in out and "RMS/255" in out


def test_a_tie_is_said_in_words_never_as_a_negative_radius(tmp_path, sample_folder, tiny_lipsim, capsys):
    from index import IngestOptions, build_index

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("camera", "coins", "rocket"):
        shutil.copy(sample_folder / f"{name}.png", photos / f"{name}.png")
    shutil.copy(sample_folder / "camera.png", photos / "camera-copy.png")  # same vector: a tie
    build_index(photos, tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=1))
    code, out, _ = _run(capsys, "query", photos / "camera.png", "--index-dir", tmp_path / "index", "-k", "1")
    assert code == 0 and "0 (tie)" in out and "tie: rank #1 ties with an item outside the top-1" in out
    code, doc = _query_json(capsys, tmp_path / "index", photos / "camera.png", "-k", "1")
    assert doc["set_radius"] == 0 and doc["hits"][0]["radius"] == 0 and "not certified" in doc["ties"][0]
    code, doc = _query_json(capsys, tmp_path / "index", photos / "camera.png", "-k", "2")
    assert doc["set_radius"] > 0 and doc["ties"] and "order" in doc["ties"][0]  # the two copies: order only


def test_every_field_of_the_query_json_is_documented(photo_index, capsys):
    folder, index_dir = photo_index
    doc_text = (Path(ROOT) / "docs" / "json.md").read_text()
    code, one = _query_json(capsys, index_dir, folder / "moon.png", "-k", "2", "--certify-eps", "0.1")
    code, batch = _query_json(capsys, index_dir, folder / "moon.png", "--id", "1", "-k", "2")
    keys = set(one) | set(one["query"]) | set(one["hits"][0]) | set(batch) | set(batch["summary"]) | {"error", "kind",
                                                                                                       "detail"}
    missing = [k for k in sorted(keys) if f"`{k}`" not in doc_text]
    assert not missing, f"docs/json.md does not document {missing}"
    assert "[height, width]" in doc_text


def test_export_refuses_outputs_that_would_overwrite_each_other(photo_index, tmp_path, capsys):
    _, index_dir = photo_index
    for parquet, npy in (("same.x", "same.x"), ("v.ids.npy", "v.npy")):
        code, _, err = _run(capsys, "index", "export", "--index-dir", index_dir, "--parquet", tmp_path / parquet,
                            "--npy", tmp_path / npy)
        assert code == 2 and "give them different names" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    for option in ("--parquet", "--npy"):
        code, _, err = _run(capsys, "index", "export", "--index-dir", index_dir, option, tmp_path / "out")
        assert code == 2 and "is a folder: give a file name" in err and ".tmp" not in err


def test_export_parquet_and_npy_round_trip(photo_index, tiny_lipsim, tmp_path, capsys):
    import pyarrow.parquet as pq

    folder, index_dir = photo_index
    code, out, _ = _run(capsys, "index", "export", "--index-dir", index_dir, "--parquet", tmp_path / "g.parquet",
                        "--npy", tmp_path / "g.npy")
    assert code == 0
    table = pq.read_table(tmp_path / "g.parquet")
    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        ids, vectors = g.all_vectors()
        order = np.argsort(ids)
        ids, vectors = ids[order], vectors[order]
        records = g.records(ids)
        paths = g.paths(ids)
        dim = g.dim
    assert table.column_names == ["id", "path", "path_bytes", "sha256", "width", "height", "vector"]
    assert [os.path.join(os.fsencode(folder), p) for p in table.column("path_bytes").to_pylist()] == [
        os.fsencode(g_path) for g_path in paths]  # the files' own bytes
    assert str(table.schema.field("vector").type) == f"fixed_size_list<element: float>[{dim}]"
    assert table.column("id").to_pylist() == ids.tolist()
    assert table.column("path").to_pylist() == [r.path for r in records]
    assert table.column("sha256").to_pylist() == [r.content_hash for r in records]
    assert table.column("width").to_pylist() == [r.width for r in records]
    assert table.column("height").to_pylist() == [r.height for r in records]
    got = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32).reshape(len(ids), dim)
    assert np.array_equal(got, vectors)  # bit for bit
    assert table.schema.metadata[b"robret.encoder"] == b"lipsim:cpu-tiny"
    assert np.array_equal(np.load(tmp_path / "g.npy"), vectors) and np.load(tmp_path / "g.npy").dtype == np.float32
    assert np.array_equal(np.load(tmp_path / "g.ids.npy"), ids)
    assert (folder / table.column("path").to_pylist()[0]).is_file()
    code, _, err = _run(capsys, "index", "export", "--index-dir", index_dir)
    assert code == 2 and "--parquet" in err


def test_every_index_subcommand_takes_index_dir_and_the_old_positional_still_works(photo_index, capsys, tmp_path):
    _, index_dir = photo_index
    code, by_option, _ = _run(capsys, "index", "stats", "--index-dir", index_dir, "--json")
    code2, by_position, _ = _run(capsys, "index", "stats", index_dir, "--json")
    assert code == code2 == 0 and json.loads(by_option) == json.loads(by_position)
    assert _run(capsys, "index", "verify", "--index-dir", index_dir)[0] == 0
    code, _, err = _run(capsys, "index", "verify", index_dir, "--index-dir", tmp_path)
    assert code == 2 and "two index directories" in err
    code, _, err = _run(capsys, "index", "stats")
    assert code == 2 and "--index-dir DIR" in err
    for action in ("update", "repair", "stats", "verify", "export"):
        with pytest.raises(SystemExit):
            main(["index", action, "--help"])
        assert "--index-dir DIR" in capsys.readouterr().out
    code, _, err = _run(capsys, "query", "--index-dir", index_dir)
    assert code == 2 and "at least one query" in err
    code, by_option, _ = _run(capsys, "dedup", "--index-dir", index_dir, "--json")
    code2, by_position, _ = _run(capsys, "dedup", index_dir, "--json")
    assert code == code2 == 0 and json.loads(by_option) == json.loads(by_position)


LIGHT_COMMANDS = [["--help"], ["encoder", "list"], ["weights", "list"], ["index", "stats", "--index-dir", "{index}"],
                  ["index", "verify", "--index-dir", "{index}"], ["index", "verify", "--index-dir", "{index}", "--deep"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=lambda a: " ".join(a[:2] + a[4:]))
def test_commands_that_need_no_model_never_import_torch(photo_index, argv):
    """Structural, not timed: what each command imports. `index stats` and `verify` read only the catalog
    and hash the index file (no numpy, no FAISS); `verify --deep` decodes the FAISS file."""
    _, index_dir = photo_index
    argv = [a.replace("{index}", str(index_dir)) for a in argv]
    probe = ("import json, sys\nfrom retrieval.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, 'faiss': 'faiss' in sys.modules,"
             " 'numpy': 'numpy' in sys.modules}), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    seen = json.loads(done.stderr.strip().splitlines()[-1])
    assert seen["code"] in (0, None) and not seen["torch"]
    assert seen["faiss"] == ("--deep" in argv)
    if argv[0] == "index" and "--deep" not in argv:
        assert not seen["numpy"]
