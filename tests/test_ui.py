"""Headless tests of the Streamlit page (streamlit.testing.v1.AppTest) against the library.

What the page displays (top-k ids, scores, certified radii, attack outcomes) must be what
index.Gallery + retrieval.search return when called directly.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from _ui_fixtures import APP

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def new_page(timeout: float = 120):
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(APP), default_timeout=timeout)


def run_clean(at):
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


TABLES = ["table_lipsim", "table_compare", "moves_lipsim", "moves_compare"]  # in page order


def table(at, key: str):
    """A displayed table as row dicts: the results tables (LipSim, comparison), then the attack's moves."""
    return at.dataframe[TABLES.index(key)].value.to_dict("records")


def upload(photo, name: str, fmt: str):
    """A fresh page with `photo` uploaded as `name` (in format fmt): (the page, the uploaded bytes)."""
    at = run_clean(new_page())
    at.radio(key="source").set_value("an upload")
    run_clean(at)
    buf = io.BytesIO()
    photo.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    at.file_uploader(key="upload").set_value((name, buf.getvalue(), f"image/{fmt.lower()}"))
    return run_clean(at), buf.getvalue()


def library_search(index_dir, image, k):
    """The library's answer for a PIL image: retrieval.search.search_image on the opened index."""
    from index import Gallery
    from retrieval.search import search_image

    with Gallery.open(index_dir, use_gpu=False) as g:
        return search_image(g, image, k=k)


def assert_table_matches(rows, res, names, radius_atol: float = 0.0):
    """radius_atol: for queries the page resizes with torch's float32 kernel and the library with the resize
    matrices (images above encoder.resize.BAND_PIXELS): inputs equal up to float rounding."""
    assert [r["id"] for r in rows] == [h.id for h in res.hits]
    assert [r["name"] for r in rows] == [names[h.id] for h in res.hits]
    np.testing.assert_allclose([r["score"] for r in rows], [h.score for h in res.hits], atol=1e-6)
    if res.certified:
        np.testing.assert_allclose([r["radius"] for r in rows], [h.radius for h in res.hits], rtol=1e-6,
                                   atol=radius_atol)
    else:
        assert all("radius" not in r or r["radius"] is None or np.isnan(r["radius"]) for r in rows)


def test_page_loads_with_both_encoders_named_and_lipsim_certified(page_env, ui_engine):
    at = run_clean(new_page())
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "lipsim:cpu-tiny (random weights)" in sidebar
    assert ui_engine.compare.label in sidebar and "no certificate" in sidebar
    html = " ".join(m.value for m in at.markdown)
    assert "top-5 set certified for ‖δ‖₂ &lt;" in html and "certified r = " in html
    lip, cmp_rows = table(at, "table_lipsim"), table(at, "table_compare")
    assert len(lip) == len(cmp_rows) == 5 and "radius" in lip[0]
    assert not any(e.value for e in at.error)


def test_gallery_query_shows_the_library_top_k_for_both_encoders(page_env, ui_engine):
    at = run_clean(new_page())
    at.text_input(key="gallery_filter").input("coffee")
    run_clean(at)
    assert at.selectbox(key="gallery_pick").options == ["coffee.png"]
    pick = at.session_state["gallery_pick"]
    assert ui_engine.name_of(pick) == "coffee.png"
    at.slider(key="k").set_value(4)
    run_clean(at)
    image = Image.open(ui_engine.by_id[pick].path)
    for side in ui_engine.sides:
        res = library_search(side.index.gallery.index_dir, image, k=4)
        if side.key == "compare":  # map the comparison gallery's ids to the page's (by path)
            for h in res.hits:
                h.id = next(g.id for g in ui_engine.gallery if g.path == h.path)
        assert_table_matches(table(at, f"table_{side.key}"), res, ui_engine.names)
    assert table(at, "table_lipsim")[0]["name"] == "coffee.png"


def test_page_opens_an_index_directory_given_to_robret_ui(page_env, ui_engine, monkeypatch):
    monkeypatch.setenv("ROBRET_UI_INDEX_DIR", str(ui_engine.index_dir))
    at = run_clean(new_page())
    assert str(ui_engine.index_dir) in " ".join(m.value for m in at.sidebar.markdown)
    assert len(table(at, "table_lipsim")) == 5


def test_comparison_can_be_an_existing_index_of_the_same_folder(page_env, ui_engine, monkeypatch):
    monkeypatch.setenv("ROBRET_UI_COMPARE", str(ui_engine.compare.index.gallery.index_dir))
    at = run_clean(new_page())
    assert ui_engine.compare.label in " ".join(m.value for m in at.sidebar.markdown)
    expected = ui_engine.search(at.session_state["query"].x, 5)["compare"].top
    assert [r["id"] for r in table(at, "table_compare")] == expected


def test_missing_comparison_encoder_is_a_message_not_a_trace(page_env, monkeypatch, tmp_path):
    monkeypatch.setenv("ROBRET_UI_COMPARE", f"standard:{tmp_path / 'absent.safetensors'}")
    at = run_clean(new_page())
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "cannot load the comparison encoder" in errors[0]


def test_random_button_picks_a_gallery_query(page_env):
    at = run_clean(new_page())
    at.button(key="random").click()
    run_clean(at)
    assert at.session_state["query_key"].startswith("gallery: ")
    assert len(table(at, "table_lipsim")) == 5


def test_upload_good_image_is_searched_like_the_library(page_env, ui_engine):
    photo = Image.open(ui_engine.by_id[ui_engine.gallery[3].id].path).convert("RGB").resize((200, 150))
    at, data = upload(photo, "my photo.png", "PNG")
    assert not at.error
    assert at.session_state["query_key"].startswith("upload: my photo.png")
    res = library_search(ui_engine.index_dir, Image.open(io.BytesIO(data)), k=5)
    assert_table_matches(table(at, "table_lipsim"), res, ui_engine.names)
    assert res.query_size == (150, 200)


def test_large_upload_is_certified_at_its_full_size_as_robret_query_states_it(page_env, ui_engine):
    """A 1300×975 upload is searched and certified at its full size (not the 1024-px working copy the
    attack searches on): the page's table, radii included, is retrieval.search.search_image's."""
    at = run_clean(new_page())
    at.radio(key="source").set_value("an upload")
    run_clean(at)
    big = Image.open(ui_engine.gallery[0].path).convert("RGB").resize((1300, 975))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=80)
    at.file_uploader(key="upload").set_value(("big.jpg", buf.getvalue(), "image/jpeg"))
    run_clean(at)
    q = at.session_state["query"]
    assert q.original_hw == (975, 1300) and tuple(q.x.shape) == (3, 975, 1300) and q.layout == "RGB"
    lib = library_search(ui_engine.index_dir, Image.open(io.BytesIO(buf.getvalue())), k=5)
    assert lib.query_size == (975, 1300)
    # The page resizes this 1.3-megapixel query with torch's float32 kernel, the library with the resize
    # matrices (encoder.resize): their inputs differ by float rounding (~1e-6 per value), which moves a radius
    # by far less than the encoder's float error does (slack / ‖P‖, the scale test_cli_bulk allows).
    tol = lib.slack / lib.input_norm
    assert tol < 1e-3 * min(h.radius for h in lib.hits if h.radius > 0)
    assert_table_matches(table(at, "table_lipsim"), lib, ui_engine.names, radius_atol=tol)
    rows = table(at, "table_lipsim")
    np.testing.assert_allclose([r["radius_rms255"] for r in rows],
                               [lib.rms255(h.radius) for h in lib.hits], rtol=1e-6, atol=lib.rms255(tol))


def bad_uploads() -> list[tuple[str, bytes, str]]:
    """(file name, bytes, what the message must say) for files the page must refuse."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    tiny = io.BytesIO()
    Image.new("RGB", (4, 40)).save(tiny, "PNG")
    return [
        ("notes.png", b"these are my notes, not an image\n" * 4, "text"),
        ("broken.png", png[: len(png) // 2], "truncated"),
        ("huge.png", b"\x89PNG" + bytes(1_200_000), "upload limit"),
        ("tiny.png", tiny.getvalue(), "too small"),
        ("empty.png", b"", "empty"),
    ]


def test_bad_uploads_give_a_message_not_a_trace(page_env):
    at = run_clean(new_page())
    at.radio(key="source").set_value("an upload")
    run_clean(at)
    for name, data, message in bad_uploads():
        at.file_uploader(key="upload").set_value((name, data, "image/png"))
        run_clean(at)
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and name in errors[0] and message in errors[0], (name, errors)
        assert "Traceback" not in errors[0]
        assert not at.dataframe and "query" not in at.session_state  # nothing searched


@pytest.mark.parametrize("kind,norm,eps", [
    ("untargeted", "l2", 2.0),
    ("targeted", "linf", 16.0),
    ("autoattack", "l2", 4.0),
])
def test_each_attack_kind_runs_and_reports_what_the_library_finds(page_env, ui_engine, kind, norm, eps):
    from index import Gallery
    from retrieval.search import search_embedding

    at = run_clean(new_page())
    at.radio(key="attack_kind").set_value(kind)
    at.radio(key="attack_norm").set_value(norm)
    run_clean(at)
    at.number_input(key=f"eps_{norm}").set_value(eps)
    at.number_input(key="attack_steps").set_value(3)
    if kind == "targeted":
        top = at.session_state["rankings"]["lipsim"].top
        target = [g.id for g in ui_engine.gallery if g.id not in top][-1]
        at.session_state["attack_target"] = target
    run_clean(at)
    at.button(key="run_attack").click()
    run_clean(at)
    assert not at.error, [e.value for e in at.error]
    att = at.session_state["attack"]
    report, results = att["report"], att["results"]
    assert report["attack"]["kind"] == kind and set(report["encoders"]) == {"lipsim", "compare"}
    labels = [m.label for m in at.metric]
    assert labels.count("overlap@5") == 2
    limit = eps if norm == "l2" else eps / 255
    for key, res in results.items():
        side = ui_engine.lipsim if key == "lipsim" else ui_engine.compare
        d = res.x_adv - at.session_state["query"].x
        assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
        measured = float(d.norm()) if norm == "l2" else float(d.abs().max())
        assert measured <= limit * (1 + 1e-4) + 1e-6
        # The "after" list is the library's search of the adversarial image.
        with Gallery.open(side.index.gallery.index_dir, use_gpu=False) as g:
            q = side.embed(res.x_adv)
            hw = tuple(res.x_adv.shape[-2:])
            lib = search_embedding(g, q, k=5, input_norm=side.encoder.input_norm(hw) if side.certified else None)
        lib_ids = [h.id for h in lib.hits]
        if key == "compare":
            lib_ids = [side.index._map(i) for i in lib_ids]
        assert [r["id"] for r in report["encoders"][key]["after"]] == lib_ids
        np.testing.assert_allclose([r["score"] for r in report["encoders"][key]["after"]],
                                   [h.score for h in lib.hits], atol=1e-6)
        overlap = len(set(res.before.top) & set(res.after.top)) / 5
        assert report["encoders"][key]["overlap_at_k"] == pytest.approx(overlap)
    cert = report["encoders"]["lipsim"]["certificate"]
    assert cert["ok"] and not cert["violated_items"]
    assert report["encoders"]["compare"]["certificate"] is None
    if kind == "targeted":
        assert report["attack"]["target"] == ui_engine.name_of(target)
        for key, res in results.items():
            assert res.target_rank == (res.before.rank_of(target), res.after.rank_of(target))
            assert res.target_rank[0] > 5
    assert [b.label for b in at.get("download_button")] == [
        "Download the adversarial image (PNG)", "Download the adversarial image (PNG)", "Download the JSON report"]


def test_a_cmyk_upload_is_attacked_and_offered_as_a_tiff_under_its_whole_name(page_env, ui_engine):
    photo = Image.open(ui_engine.by_id[ui_engine.gallery[2].id].path).convert("CMYK").resize((96, 72))
    at, _ = upload(photo, "IMG (1).jpg", "JPEG")
    assert at.session_state["query"].layout == "CMYK" and at.session_state["query"].label == "upload: IMG (1).jpg"
    at.number_input(key="attack_steps").set_value(2)
    run_clean(at)
    at.button(key="run_attack").click()
    run_clean(at)
    assert not at.error, [e.value for e in at.error]
    att = at.session_state["attack"]
    assert att["report"]["query"]["source"] == "upload: IMG (1).jpg"
    assert [b.label for b in at.get("download_button")][:2] == ["Download the adversarial image (TIFF)"] * 2
    for key, res in att["results"].items():  # the file holds the attacked samples, in the query's own mode
        data, suffix, mime = att["images"][key][3]
        saved = Image.open(io.BytesIO(data))
        assert (suffix, mime, saved.mode) == (".tiff", "image/tiff", "CMYK")
        x = res.x_adv.detach().cpu().numpy()
        assert np.abs(np.asarray(saved, np.float64).transpose(2, 0, 1) / 255 - x).max() <= 0.5 / 255 + 1e-6


def test_attack_inside_the_certified_radius_keeps_lipsim_top_k_and_says_so(page_env, ui_engine):
    at = run_clean(new_page())
    set_radius = at.session_state["rankings"]["lipsim"].set_radius
    at.number_input(key="eps_l2").set_value(round(set_radius * 0.9, 3))
    at.number_input(key="attack_steps").set_value(5)
    at.button(key="run_attack").click()
    run_clean(at)
    cert = at.session_state["attack"]["report"]["encoders"]["lipsim"]["certificate"]
    assert cert["within_radius"] and not cert["set_changed"] and cert["ok"]
    assert any("Certificate held" in s.value for s in at.success)


def test_two_sessions_share_the_models_but_not_their_queries(page_env):
    a, b = run_clean(new_page()), run_clean(new_page())
    b.text_input(key="gallery_filter").input("moon")
    run_clean(b)
    a.text_input(key="gallery_filter").input("brick")
    run_clean(a)
    assert a.session_state["query_key"] == "gallery: brick.png"
    assert b.session_state["query_key"] == "gallery: moon.png"
    assert table(a, "table_lipsim")[0]["name"] == "brick.png"
    assert table(b, "table_lipsim")[0]["name"] == "moon.png"


def test_attack_on_a_gallery_larger_than_the_attack_pool_optimises_on_the_query_neighbourhood(ui_engine,
                                                                                             monkeypatch):
    from ui.engine import AttackSpec

    small_pool = ui_engine
    monkeypatch.setattr(small_pool, "cfg", ui_engine.cfg.replace(attack_pool=8))
    x, _ = ui_engine_query(small_pool, "chelsea.png")
    far = small_pool.search(x, 3)["lipsim"].ids[-1]  # the last-ranked photo: outside the top-8 pool
    ids, _ = small_pool.lipsim.index.candidates(small_pool.search(x, 3)["lipsim"].embedding, 8, (int(far),))
    assert len(ids) == 9 and int(far) in ids.tolist()
    res = small_pool.attack(x, AttackSpec("targeted", "l2", 1.0, 2, 3, target_id=int(far)))
    for r in res.values():
        assert r.after.k == 3 and r.target_rank[0] is not None and r.delta_l2 <= 1.0 + 1e-4


def ui_engine_query(engine, name):
    """(samples, (H, W)) of a gallery photo as the page queries it (RGB photos only here)."""
    from ui.query import query_pixels

    item = next(g for g in engine.gallery if g.name == name)
    q = query_pixels(engine.image(item.id))
    assert q.layout == "RGB"
    return q.x, q.original_hw


def test_engine_serialises_concurrent_searches_from_two_threads(ui_engine):
    import threading

    x = torch.rand(3, 48, 64)
    expected = ui_engine.search(x, 3)
    out, errors = [], []

    def work():
        try:
            out.append(ui_engine.search(x, 3))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 4
    for r in out:
        assert r["lipsim"].top == expected["lipsim"].top and r["compare"].top == expected["compare"].top


def test_two_pages_opening_at_once_wait_for_one_demo_index_build(tmp_path):
    """Two sessions (or `robret ui` processes) opening on an empty cache: the second waits for the
    first's build instead of failing on the index's non-blocking writer lock."""
    import threading

    from ui.backend import demo_index
    from ui.config import UIConfig

    cfg = UIConfig(cache_dir=str(tmp_path / "cache"), demo_encoder="lipsim:cpu-tiny")
    out, errors = [], []

    def work():
        try:
            out.append(demo_index(cfg))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 2 and out[0] == out[1]


def test_ui_command_serves_on_localhost_with_the_upload_limit(tmp_path):
    from retrieval.cli import build_parser
    from retrieval.commands.ui_cmd import streamlit_command

    args = build_parser().parse_args(["ui", "--index-dir", str(tmp_path), "--compare", "pixels", "--port", "8765",
                                      "--max-upload-mb", "3"])
    cmd, env = streamlit_command(args)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == "3"
    assert env["ROBRET_UI_INDEX_DIR"] == str(tmp_path.resolve())
    assert env["ROBRET_UI_COMPARE"] == "pixels" and env["ROBRET_UI_MAX_UPLOAD_MB"] == "3"
    with pytest.raises(FileNotFoundError):
        streamlit_command(build_parser().parse_args(["ui", "--index-dir", str(tmp_path / "nope")]))


def test_ui_command_says_a_port_in_use_and_a_bad_setting_before_starting_streamlit(tmp_path, capsys, monkeypatch):
    import socket

    from retrieval.cli import main
    from ui.config import UIConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert main(["ui", "--index-dir", str(tmp_path), "--port", str(busy)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{busy}" in err and "serving" not in err
    with pytest.raises(ValueError, match="ROBRET_UI_MAX_STEPS='lots': expected a whole number"):
        UIConfig.from_env({"ROBRET_UI_MAX_STEPS": "lots"})
    monkeypatch.setenv("ROBRET_UI_MAX_UPLOAD_MB", "abc")
    assert main(["ui", "--index-dir", str(tmp_path), "--port", "0"]) == 1
    assert "ROBRET_UI_MAX_UPLOAD_MB='abc'" in capsys.readouterr().err


def test_comparison_is_dreamsim_when_its_weights_load_else_the_standard_baseline(monkeypatch, tmp_path):
    import encoder
    from ui import backend
    from ui.config import UIConfig

    assert backend.DEFAULT_DREAMSIM == "dreamsim:ensemble" and backend.FALLBACK_COMPARE == "standard:demo"
    # No DreamSim weights (an empty cache): the baseline, with the reason on the page.
    monkeypatch.setenv("ROBRET_DREAMSIM_CACHE", str(tmp_path))
    monkeypatch.setattr(backend, "FALLBACK_COMPARE", "pixels")
    spec, enc, notes = backend.pick_compare(UIConfig())
    assert spec == "pixels" and enc.name == "pixels"
    assert len(notes) == 1 and "DreamSim is not available" in notes[0] and "pixels" in notes[0]
    # From the weights cache (a long path): said whole, where the file's folder comes from and how to move it.
    monkeypatch.delenv("ROBRET_DREAMSIM_CACHE")
    monkeypatch.setenv("ROBRET_WEIGHTS_DIR", str(tmp_path / ("weights-" * 12)))
    _, _, notes = backend.pick_compare(UIConfig())
    assert f"missing from {tmp_path / ('weights-' * 12) / 'dreamsim'}" in notes[0]
    assert "the dreamsim folder of the weights cache, $ROBRET_WEIGHTS_DIR; or set $ROBRET_DREAMSIM_CACHE" in notes[0]
    monkeypatch.setenv("ROBRET_DREAMSIM_CACHE", str(tmp_path))
    # DreamSim loads: it is the comparison, no note.
    real = encoder.load_encoder
    monkeypatch.setattr(encoder, "load_encoder",
                        lambda spec, **kw: real("pixels:64") if spec == "dreamsim:ensemble" else real(spec, **kw))
    spec, enc, notes = backend.pick_compare(UIConfig())
    assert spec == "dreamsim:ensemble" and notes == []
    # Neither: a message that says what to do.
    monkeypatch.setattr(encoder, "load_encoder", lambda spec, **kw: (_ for _ in ()).throw(ValueError("absent")))
    with pytest.raises(backend.SetupError, match="--compare"):
        backend.pick_compare(UIConfig())


def test_the_comparison_ranks_only_the_images_of_the_primary_gallery(ui_env, tmp_path, sample_folder, tiny_lipsim):
    """A primary gallery built from a list (or before files were added) holds fewer files than its folder; the
    comparison index, built over the folder, must not rank the others (they showed as "not in the primary
    gallery" and pushed real items out of its top-k)."""
    from index import IngestOptions, build_index
    from retrieval.attacks import PGDConfig, attack_query
    from ui.backend import open_gallery
    from ui.config import UIConfig

    from _index_fixtures import copy_photos

    folder = copy_photos(sample_folder, tmp_path / "photos")
    listed = sorted(folder.iterdir())[:4]
    (tmp_path / "some.txt").write_text("".join(f"{p}\n" for p in listed))
    build_index(f"@{tmp_path / 'some.txt'}", tmp_path / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim,
                options=IngestOptions(workers=1))
    cfg = UIConfig.from_env({**ui_env, "ROBRET_UI_INDEX_DIR": str(tmp_path / "index"),
                             "ROBRET_UI_CACHE_DIR": str(tmp_path / "cache")})
    opened = open_gallery(cfg)
    side = opened.compare_index
    assert len(side.gallery) == len(list(folder.iterdir()))
    assert len(side) == len(listed) and len(side.hidden) == len(side.gallery) - len(listed)
    primary_ids = {i for i, _, _ in opened.items}
    q = side.gallery.vectors([next(i for i in side.gallery.ids() if int(i) in side.hidden)])[0]
    res = side.search(q, k=3, depth=len(listed), input_norm=None, query_size=(32, 32))
    assert set(res.ids.tolist()) <= primary_ids and len(res.ids) == len(listed)  # (the hidden image itself is not)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = attack_query(side.gallery, x, config=PGDConfig(norm="l2", eps=0.5, steps=2), k=2,
                       embedder=None, exclude=side.hidden)
    for ranking in (out.before, out.after):
        assert not set(int(i) for i in ranking.ids) & set(side.hidden)
