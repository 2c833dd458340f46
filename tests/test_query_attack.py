"""One query attacked against a gallery, reported next to its certificate (retrieval.attacks.attack_query),
through `robret attack` and `robret demo` run end to end, and the one comparison-encoder chooser."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from encoder.certify import certify_topk_bruteforce
from retrieval.attacks import CertificateCheck, ImageEmbedder, VectorGallery, query_image, rank_query
from retrieval.cli import main

WORK_SIDE = 96  # the attack command searches on a copy of this side: small tensors, fast attacks


def _attack(tmp_path, photo_index, *extra) -> dict:
    folder, index_dir = photo_index
    out = tmp_path / "attack.json"
    rc = main(["attack", str(folder / "chelsea.png"), "--index-dir", str(index_dir), "-k", "3", "--steps", "5",
               "--work-side", str(WORK_SIDE), "--json-out", str(out), *extra])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 1
    return doc["results"][0]


def test_attack_command_reports_norms_within_eps_and_the_certificate_of_the_attacked_tensor(
        tmp_path, photo_index, tiny_lipsim):
    folder, _ = photo_index
    report = _attack(tmp_path, photo_index, "--eps", "3")
    assert report["kind"] == "untargeted" and report["attack"]["norm"] == "l2"
    assert report["delta_l2"] <= 3 * (1 + 1e-5) and report["delta_linf"] <= 1
    assert report["before"]["top"][0]["path"] == str(folder / "chelsea.png")
    # The certificate is the one of the image the user gave (full size; the attack only searched on a
    # WORK_SIDE copy), radii divided by the norm of its resize to the encoder input.
    x = query_image(Image.open(folder / "chelsea.png")).x
    assert list(x.shape[-2:]) == report["query_size"] == [300, 451]
    assert any("copy" in n for n in report["notes"])
    from index import Gallery

    from encoder.certify import slack_for

    with Gallery.open(photo_index[1], encoder=tiny_lipsim) as g:
        ids, vecs = g.all_vectors()
        slack = slack_for(g.float_error, g.max_norm)  # the slack search uses: the encoder's float error
    q = ImageEmbedder(tiny_lipsim).embed(x[None])[0].numpy()
    top, radius, set_radius = certify_topk_bruteforce(q, vecs, 3, 1.0, slack=slack)
    norm = tiny_lipsim.input_norm(tuple(x.shape[-2:]))
    assert [r["id"] for r in report["before"]["top"]] == ids[top].tolist()
    assert report["certificate"]["set_radius"] == pytest.approx(set_radius / norm, rel=1e-5)
    assert [r["radius"] for r in report["before"]["top"]] == pytest.approx((radius / norm).tolist(), rel=1e-5)
    cert = report["certificate"]
    assert cert["ok"] and not cert["violated_items"]
    assert cert["within_radius"] == (report["delta_l2"] < cert["set_radius"])
    after = {r["id"] for r in report["after"]["top"]}
    assert cert["set_changed"] == (after != {r["id"] for r in report["before"]["top"]})
    assert report["overlap_at_k"] == pytest.approx(len(after & set(ids[top].tolist())) / 3)


def test_attack_command_inside_the_certified_radius_changes_nothing(tmp_path, photo_index):
    radius = _attack(tmp_path, photo_index, "--eps", "1")["certificate"]["set_radius"]
    assert radius > 1e-3
    report = _attack(tmp_path, photo_index, "--eps", f"{0.9 * radius:.6f}")
    cert = report["certificate"]
    assert report["delta_l2"] <= 0.9 * radius * (1 + 1e-4)
    assert cert["within_radius"] and not cert["set_changed"] and cert["ok"] and cert["verdict"].startswith("held")
    assert report["overlap_at_k"] == 1.0 and not report["success"]


def test_attack_command_targeted_linf_stays_in_its_box_and_tracks_the_target(tmp_path, photo_index):
    report = _attack(tmp_path, photo_index, "--norm", "linf", "--eps", "0.1", "--target-rank", "6",
                     "--save", str(tmp_path / "adv.png"))
    assert report["kind"] == "targeted" and report["attack"]["norm"] == "linf"
    assert report["delta_linf"] <= 0.1 + 1e-6
    assert report["target_rank"]["before"] == 6 and report["target"] is not None
    assert report["success"] == (report["target"] in [r["id"] for r in report["after"]["top"]])
    assert report["certificate"]["ok"]
    assert Image.open(tmp_path / "adv.png").size == tuple(reversed(report["query_size"]))


def test_certificate_check_flags_exactly_the_promises_an_attack_broke():
    # Four unit vectors on a circle; the query sits at angle 0, near item 0, with item 1 next.
    angles = np.array([0.0, 0.5, 1.2, 2.5])
    g = VectorGallery(np.stack([np.cos(angles), np.sin(angles)], 1), lipschitz=1.0)
    before = rank_query(g, np.array([1.0, 0.0]), 2)
    moved = rank_query(g, np.array([np.cos(1.0), np.sin(1.0)]), 2)  # top-2 becomes {1, 2}
    radii = [h.radius for h in before.search.hits]
    assert before.top == [0, 1] and moved.top == [2, 1]
    # ‖δ‖ below the set radius and the set changed: item 0 was promised to stay
    bad = CertificateCheck.of(before, moved, 0.5 * before.search.set_radius)
    assert bad.within_radius and bad.set_changed and bad.violated_items == [0] and not bad.ok
    # ‖δ‖ beyond item 0's radius: the change was allowed (only items with a larger radius are promised)
    fine = CertificateCheck.of(before, moved, radii[0] * 1.01)
    assert fine.ok and fine.set_changed and 0 not in fine.guaranteed_items
    # nothing moved: never a violation, whatever ‖δ‖
    assert CertificateCheck.of(before, before, 0.0).ok


def test_demo_runs_end_to_end_and_compares_with_dreamsim_when_its_weights_load(tmp_path, monkeypatch, capsys):
    """`robret demo` with no --compare uses the chooser the UI uses: DreamSim when it loads. Its weights
    are not here, so a stand-in encoder answers to dreamsim:ensemble; every attack stays within ε and
    no certificate is broken."""
    import encoder

    real = encoder.load_encoder
    monkeypatch.setattr(encoder, "load_encoder",
                        lambda spec, **kw: real("pixels:32") if spec == "dreamsim:ensemble" else real(spec, **kw))
    out = tmp_path / "demo.json"
    rc = main(["demo", "--dir", str(tmp_path / "work"), "--encoder", "lipsim:cpu-tiny", "--steps", "2", "-k", "3",
               "--eps", "20", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["encoders"] == {"LipSim": "lipsim:cpu-tiny", "comparison": "dreamsim:ensemble"}
    assert "[comparison] dreamsim:ensemble" in capsys.readouterr().out
    lip_radius = report["searches"]["LipSim"]["set_radius"]
    assert lip_radius > 0
    attacks = report["attacks"]
    assert {(a["budget"], a["role"]) for a in attacks} == {
        (b, r) for b in ("inside LipSim's top-1 certificate", "larger budget") for r in ("LipSim", "comparison")}
    for a in attacks:
        assert a["delta_l2"] <= a["eps"] * (1 + 1e-5) and a["target_rank"]["before"] > 1
        if a["certificate"] is not None:
            assert a["certificate"]["ok"]
        if a["role"] == "LipSim" and a["budget"].startswith("inside"):
            assert a["certificate"]["within_radius"] and not a["certificate"]["set_changed"]
            assert a["after"]["top"][0]["id"] == a["before"]["top"][0]["id"]


def test_attack_command_perturbs_a_grayscale_file_in_its_own_channel_and_its_certificate_holds(
        tmp_path, photo_index, tiny_lipsim, capsys):
    """moon.png is 8-bit grayscale: the attack perturbs its 1-channel samples, and the radius it is compared
    with is stated over them (divided by the channel factor √3 as well as the resize norm)."""
    folder, index_dir = photo_index
    q = query_image(Image.open(folder / "moon.png"))
    assert q.layout == "L" and q.x.shape[0] == 1 and "(L, 1-channel" in q.space
    emb = ImageEmbedder(tiny_lipsim, layout="L")
    assert emb.input_norm(tuple(q.x.shape[-2:])) == pytest.approx(
        np.sqrt(3) * ImageEmbedder(tiny_lipsim).input_norm(tuple(q.x.shape[-2:])), rel=1e-9)
    from retrieval.attacks import attack_query
    from index import Gallery

    with Gallery.open(index_dir, encoder=tiny_lipsim) as g:
        first = attack_query(g, q.x, k=3, layout="L", config=None, work_side=WORK_SIDE)
        radius = first.certificate.set_radius
        from encoder.attack import PGDConfig

        inside = attack_query(g, q.x, k=3, layout="L", config=PGDConfig(norm="l2", eps=0.95 * radius, steps=20),
                              work_side=WORK_SIDE)
    assert inside.delta_l2 <= 0.95 * radius * (1 + 1e-5) and inside.certificate.ok
    assert inside.after.top == inside.before.top  # nothing moves inside the certified radius
    out = tmp_path / "moon.json"
    assert main(["attack", str(folder / "moon.png"), "--index-dir", str(index_dir), "-k", "3", "--steps", "3",
                 "--work-side", str(WORK_SIDE), "--json-out", str(out)]) == 0
    assert "over the file's own samples (L, 1-channel" in capsys.readouterr().out


def test_attack_command_saves_a_grayscale_query_in_its_own_mode(tmp_path, photo_index):
    """--save writes the adversarial samples in the file's own mode (here 8-bit L), the space ‖δ‖ is over."""
    folder, index_dir = photo_index
    out = tmp_path / "moon-adv.png"
    assert main(["attack", str(folder / "moon.png"), "--index-dir", str(index_dir), "-k", "3", "--steps", "3",
                 "--work-side", str(WORK_SIDE), "--save", str(out), "--json-out", str(tmp_path / "r.json")]) == 0
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (512, 512)  # the original's size: the adversarial original
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["saved"]["path"] == str(out)


def test_save_dir_gives_queries_that_share_a_name_their_own_files_and_save_takes_only_png(tmp_path, photo_index,
                                                                                          capsys):
    folder, index_dir = photo_index
    for sub, photo in (("a", "chelsea.png"), ("b", "coffee.png")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.png").write_bytes((folder / photo).read_bytes())
    saved = tmp_path / "advs"
    assert main(["attack", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "--index-dir",
                 str(index_dir), "-k", "3", "--steps", "2", "--work-side", str(WORK_SIDE), "--save-dir", str(saved),
                 "--json-out", str(tmp_path / "r.json")]) == 0
    records = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["saved"]["path"] for r in records] == [str(saved / "x.adv.png"), str(saved / "x-2.adv.png")]
    with Image.open(saved / "x.adv.png") as first, Image.open(saved / "x-2.adv.png") as second:
        assert first.size == Image.open(folder / "chelsea.png").size
        assert second.size == Image.open(folder / "coffee.png").size
    capsys.readouterr()
    for bad in (tmp_path / "adv.jpg", tmp_path / "adv", saved):
        with pytest.raises(SystemExit) as exit_:
            main(["attack", str(folder / "chelsea.png"), "--index-dir", str(index_dir), "--save", str(bad)])
        assert exit_.value.code == 2 and "--save writes a PNG file" in capsys.readouterr().err
    assert not (tmp_path / "adv.jpg").exists()


def test_save_writes_a_cmyk_query_as_a_tiff_in_its_own_mode(tmp_path, photo_index):
    folder, index_dir = photo_index
    query = tmp_path / "q.jpg"
    Image.open(folder / "chelsea.png").convert("CMYK").save(query, quality=95)
    assert main(["attack", str(query), "--index-dir", str(index_dir), "-k", "3", "--steps", "2", "--work-side",
                 str(WORK_SIDE), "--save", str(tmp_path / "adv.png"), "--json-out", str(tmp_path / "r.json")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())["results"][0]["saved"]
    assert saved["path"] == str(tmp_path / "adv.tiff") and not (tmp_path / "adv.png").exists()
    with Image.open(tmp_path / "adv.tiff") as im:
        assert im.mode == "CMYK" and im.size == Image.open(query).size


@pytest.mark.parametrize("extra,message", [
    (["-k", "0"], "must be at least 1"), (["--eps", "-1"], "finite number ≥ 0"), (["--eps", "nan"], "finite number"),
    (["--steps", "0"], "must be at least 1"), (["--json", "/nonexistent-folder/x.json"], "no folder"),
])
def test_demo_refuses_bad_arguments_before_any_work(tmp_path, capsys, extra, message):
    try:
        code = main(["demo", "--dir", str(tmp_path / "demo"), *extra])
    except SystemExit as exit_:  # (argparse)
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
