"""The Python API example in README.md runs as written, on a tiny gallery, so that it cannot rot."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PHOTOS = ("coffee", "moon", "coins", "rocket")


def readme_gallery_example() -> str:
    """The Python block of README.md's "Using it from Python" section that opens a gallery."""
    section = README.read_text().split("## Using it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    found = [b for b in blocks if "Gallery.open" in b]
    assert len(found) == 1, "README.md: expected one Python block that opens a gallery"
    return found[0]


@pytest.mark.usefixtures("one_thread")
def test_readme_python_api_example_runs(tmp_path, sample_folder, monkeypatch, capsys):
    (tmp_path / "photos").mkdir()
    for name in PHOTOS:
        shutil.copy(sample_folder / f"{name}.png", tmp_path / "photos" / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_gallery_example(), str(README), "exec"), namespace)  # noqa: S102 — our own README
    out = capsys.readouterr().out
    assert "top-3 set certified for ‖δ‖₂ <" in out and "certificate held: True" in out
    assert (tmp_path / "photos-index" / "robret-index.json").is_file()
    res, batch, doc = namespace["res"], namespace["batch"], namespace["doc"]
    assert len(res.hits) == 3 and res.hits[0].path.name == "coffee.png" and res.set_radius > 0
    assert doc["schema"] and doc["hits"][0]["radius_rms255"] == pytest.approx(res.rms255(res.hits[0].radius))
    assert [r.hits[0].path.name for r in batch] == ["moon.png", "coffee.png"]
    # exclude_self: no query finds its own file
    lines = [line for line in out.splitlines() if line.startswith("photos/")]
    assert len(lines) == len(PHOTOS) and all(line.split()[0].split("/")[1] not in line.split(" ", 1)[1] for line in lines)
