"""`robret attack` as a researcher uses it: one JSON document on stdout, batches with the model loaded once,
AutoAttack stated as robret's configuration, targeted ranks before/after, ε as 8/255 or a decimal (ℓ∞ above 1
refused), and the working copy the attack searches on (its norms checked against dense matrices)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.cli import main
from retrieval.schema import SCHEMA_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")

WORK = ["--work-side", "64", "--steps", "3", "-k", "3"]


def run_json(capsys, *argv) -> tuple[int, dict]:
    rc = main(["attack", *argv, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)  # stdout holds exactly one JSON document


def test_json_goes_to_stdout_as_one_document_with_the_schema_and_rms_radii(capsys, photo_index):
    folder, index_dir = photo_index
    rc, doc = run_json(capsys, str(folder / "chelsea.png"), "--index-dir", str(index_dir), *WORK, "--eps", "0.5")
    assert rc == 0 and doc["schema"] == SCHEMA_VERSION and doc["command"] == "attack"
    assert doc["threat"] == {**doc["threat"], "norm": "l2", "eps": 0.5}
    (res,) = doc["results"]
    h, w = res["query_size"]
    assert (h, w) == (300, 451)
    n = 3 * h * w
    before = res["before"]
    assert before["set_radius_rms255"] == pytest.approx(before["set_radius"] / math.sqrt(n) * 255, rel=1e-9)
    for row in before["top"]:
        assert row["radius_rms255"] == pytest.approx(row["radius"] / math.sqrt(n) * 255, rel=1e-9)
    assert res["delta_l2_rms255"] == pytest.approx(res["delta_l2"] / math.sqrt(n) * 255, rel=1e-9)
    assert res["delta_l2"] <= 0.5 * (1 + 1e-6)


def test_batch_of_a_folder_and_a_list_loads_the_index_once_and_matches_single_runs(capsys, photo_index, tmp_path,
                                                                                   monkeypatch):
    folder, index_dir = photo_index
    sub = tmp_path / "queries" / "nested"
    sub.mkdir(parents=True)
    for name in ("coffee.png", "moon.png"):
        (sub / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "queries" / "notes.txt").write_text("not an image: skipped by the folder walk")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# queries\n{folder / 'chelsea.png'}\n\n{folder / 'coffee.png'}\n")
    from index.gallery import Gallery

    opened = []
    real_open = Gallery.open.__func__

    def counting_open(cls, *a, **kw):
        opened.append(a)
        return real_open(cls, *a, **kw)

    monkeypatch.setattr(Gallery, "open", classmethod(counting_open))
    rc, doc = run_json(capsys, str(tmp_path / "queries"), f"@{listing}", "--index-dir", str(index_dir), *WORK)
    assert rc == 0 and len(opened) == 1
    names = [r["query"] for r in doc["results"]]
    assert names == [str(sub / "coffee.png"), str(sub / "moon.png"), str(folder / "chelsea.png"),
                     str(folder / "coffee.png")]
    rc, single = run_json(capsys, str(folder / "moon.png"), "--index-dir", str(index_dir), *WORK)
    batch_moon, one_moon = doc["results"][1], single["results"][0]
    assert batch_moon["before"] == one_moon["before"]  # same top-k, scores and radii
    assert batch_moon["delta_l2"] == pytest.approx(one_moon["delta_l2"], rel=1e-5)


def test_a_bad_file_in_a_batch_is_reported_and_the_batch_goes_on(capsys, photo_index, tmp_path):
    folder, index_dir = photo_index
    bad = tmp_path / "broken.png"
    bad.write_bytes((folder / "coffee.png").read_bytes()[:300])
    rc = main(["attack", str(bad), str(folder / "coffee.png"), "--index-dir", str(index_dir), *WORK, "--json"])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert rc == 1 and doc["failed"] == 1
    assert doc["results"][0]["error"]["kind"] == "truncated" and doc["results"][0]["error"]["detail"]
    assert doc["results"][1]["before"]["top"][0]["path"] == str(folder / "coffee.png")
    assert "broken.png" in captured.err


def test_eps_as_a_fraction_is_the_same_budget_for_both_norms(capsys, photo_index):
    folder, index_dir = photo_index
    rc, doc = run_json(capsys, str(folder / "coffee.png"), "--index-dir", str(index_dir), *WORK,
                       "--norm", "linf", "--eps", "8/255")
    assert rc == 0 and doc["threat"]["eps"] == pytest.approx(8 / 255)
    assert doc["results"][0]["delta_linf"] <= 8 / 255 + 1e-7
    rc, doc = run_json(capsys, str(folder / "coffee.png"), "--index-dir", str(index_dir), *WORK,
                       "--norm", "l2", "--eps", "1/2")
    assert rc == 0 and doc["threat"]["eps"] == 0.5 and doc["results"][0]["delta_l2"] <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--norm", "linf", "--eps", "8"], "exceeds the [0, 1] pixel range"),
    (["--eps", "eight"], "not a number or a fraction"),
    (["--eps", "1/0"], "divides by zero"),
    (["--attack", "autoattack", "--target-rank", "4"], "untargeted"),
    (["--steps", "0"], "must be at least 1"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, photo_index, argv, message):
    folder, index_dir = photo_index
    with pytest.raises(SystemExit) as exc:
        main(["attack", str(folder / "coffee.png"), "--index-dir", str(index_dir), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_query_exits_2(capsys, photo_index, tmp_path):
    _, index_dir = photo_index
    with pytest.raises(SystemExit) as exc:
        main(["attack", str(tmp_path / "nope.png"), "--index-dir", str(index_dir)])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_targeted_attack_reports_the_target_rank_before_and_after(capsys, photo_index, tmp_path):
    folder, index_dir = photo_index
    rc = main(["attack", str(folder / "chelsea.png"), "--index-dir", str(index_dir), *WORK, "--eps", "5",
               "--target-rank", "7", "--json-out", str(tmp_path / "t.json")])
    text = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    res = doc["results"][0]
    target = res["target"]
    assert res["kind"] == "targeted" and res["target_rank"]["before"] == 7
    after_ids = [r["id"] for r in res["after"]["top"]]
    if target in after_ids:
        assert res["target_rank"]["after"] == after_ids.index(target) + 1 and res["success"]
    else:
        assert res["target_rank"]["after"] is None or res["target_rank"]["after"] > 3
    assert "rank 7 → " in text
    assert ("* target" in text) == res["success"]  # marked in the adversarial top-k when it got there


def test_autoattack_is_stated_as_robrets_configuration_in_help_text_and_json(capsys, photo_index):
    folder, index_dir = photo_index
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "not RobustBench's standard evaluation" in " ".join(capsys.readouterr().out.split())
    rc = main(["attack", str(folder / "coffee.png"), "--index-dir", str(index_dir), *WORK, "--attack", "autoattack"])
    assert rc == 0 and "robret's AutoAttack configuration" in capsys.readouterr().out
    rc, doc = run_json(capsys, str(folder / "coffee.png"), "--index-dir", str(index_dir), *WORK,
                       "--attack", "autoattack", "--eps", "2")
    res = doc["results"][0]
    assert doc["kind"] == res["kind"] == "autoattack" and "not RobustBench" in doc["configuration"]
    assert res["delta_l2"] <= 2 * (1 + 1e-6) and res["certificate"]["ok"]
    assert res["success"] == (res["before"]["top"][0]["id"] != res["after"]["top"][0]["id"])


def _dense_resize(small: tuple[int, int], big: tuple[int, int]) -> np.ndarray:
    """The working copy's way back (U: small → big, one channel) as a dense matrix, column by column."""
    from encoder.preprocess import resize

    cols = []
    for k in range(small[0] * small[1]):
        e = torch.zeros(small[0] * small[1], dtype=torch.float64)
        e[k] = 1
        cols.append(resize(e.view(1, 1, *small), big).reshape(-1).numpy())
    return np.stack(cols, 1)


def test_working_copy_budgets_are_the_exact_norms_of_the_way_back():
    from retrieval.attacks import working_copy

    x = torch.rand(1, 3, 23, 17, dtype=torch.float32)
    copy = working_copy(x, 9)
    assert copy.hw == (9, 7)
    u = _dense_resize(copy.hw, (23, 17))
    l2, linf = np.linalg.norm(u, 2), np.abs(u).sum(1).max()
    assert l2 <= copy.up_l2 <= l2 * (1 + 2e-5)
    assert linf <= copy.up_linf <= linf * (1 + 2e-5)
    assert working_copy(x, 23) is None  # no copy when the image is small enough


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_lifted_perturbations_stay_inside_the_originals_threat_set(norm):
    from retrieval.attacks import working_copy

    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 31)
    copy = working_copy(x, 12)
    eps = 0.7 if norm == "l2" else 6 / 255
    eps_w = copy.budget(norm, eps)
    for _ in range(5):
        eta = torch.randn_like(copy.x)
        eta = eta / eta.norm() * eps_w if norm == "l2" else eta.sign() * eps_w  # on the copy's sphere / corner
        adv = copy.lift(x, (copy.x + eta), norm, eps)
        delta = adv - x
        size = float(delta.norm()) if norm == "l2" else float(delta.abs().max())
        assert size <= eps * (1 + 1e-6) and float(adv.min()) >= 0 and float(adv.max()) <= 1
        assert size > 0.2 * eps  # the copy's perturbation did reach the original
