"""One radius everywhere: `robret query`, `robret attack` and the page certify the image the user gave.

A photo larger than both working sizes (the attack command's 512 px, the page's 1024 px) gets the same
top-k set radius — ℓ2 over the file's own samples and as RMS per sample in 1/255 — from the three front
ends (the issue's report: 3.51 / 0.615 / 1.23 for one photo before this was fixed)."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from retrieval.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("mode,size", [("RGB", (1300, 866)), ("L", (1100, 1050))])
def test_query_attack_and_page_state_one_radius_for_one_large_photo(ui_engine, tmp_path, capsys, mode, size):
    from ui.query import query_pixels

    photo = tmp_path / f"large-{mode}.png"
    Image.open(ui_engine.gallery[3].path).convert(mode).resize(size, Image.BICUBIC).save(photo)
    index_dir = str(ui_engine.index_dir)
    k = 4

    assert main(["query", str(photo), "--index-dir", index_dir, "-k", str(k), "--json", "--cpu"]) == 0
    query = json.loads(capsys.readouterr().out)
    assert main(["attack", str(photo), "--index-dir", index_dir, "-k", str(k), "--steps", "1", "--json"]) == 0
    attack = json.loads(capsys.readouterr().out)["results"][0]
    q = query_pixels(Image.open(photo))
    page = ui_engine.search(q.x, k, layout=q.layout)["lipsim"]

    channels = 3 if mode == "RGB" else 1
    values = channels * size[0] * size[1]
    assert query["query_size"] == attack["query_size"] == [size[1], size[0]] == list(q.original_hw)
    assert q.layout == mode and values == q.x.numel()
    assert any("copy" in n for n in attack["notes"])  # the attack did search on a 512-px copy
    radius = query["set_radius"]
    assert radius > 0
    assert attack["before"]["set_radius"] == pytest.approx(radius, rel=1e-5)
    assert page.set_radius == pytest.approx(radius, rel=1e-5)
    assert [h["id"] for h in query["hits"]] == [r["id"] for r in attack["before"]["top"]] == page.top
    rms = radius / math.sqrt(values) * 255
    assert query["set_radius_rms255"] == pytest.approx(rms, rel=1e-9)
    assert attack["before"]["set_radius_rms255"] == pytest.approx(rms, rel=1e-5)
    assert page.rms255(page.set_radius) == pytest.approx(rms, rel=1e-5)
