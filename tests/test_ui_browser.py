"""A real browser on the real server: `robret ui` in a subprocess on a free localhost port, Debian's
chromium driven by Playwright (no browser download: tests/browser/setup.sh installs both, `make test`
runs it). Runs a gallery query and an attack and saves a screenshot under the test's tmp dir.

The docs screenshot comes from the same steps on the page's real defaults:
    python tests/test_ui_browser.py docs/ui-screenshot.png [robret ui options]
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _require_browser():
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        msg = f"{' and '.join(missing)} missing: run tests/browser/setup.sh (make test does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _robret() -> list[str]:
    script = Path(sys.executable).with_name("robret")
    return [str(script)] if script.exists() else [sys.executable, "-m", "retrieval.cli"]


@contextlib.contextmanager
def serve(args: list[str], env: dict[str, str], log_path: Path):
    """`robret ui ARGS --port <free port>` in its own process group; yields the URL; ends the group."""
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([*_robret(), "ui", *args, "--port", str(port)], env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"robret ui exited with {proc.returncode}: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("robret ui did not answer within 60 s")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:  # streamlit's graceful stop can take seconds; not needed here
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def query_attack_screenshot(url: str, shot: Path, profile_dir: Path, query: str = "coffee", steps: int = 5,
                            linf_eps: int | None = None) -> None:
    """In Debian's chromium: search the gallery for `query`, attack it (untargeted top-k, ℓ2 ε = 0.5,
    or ℓ∞ ε = linf_eps/255), screenshot the whole page."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1000})
        try:
            page = ctx.new_page()
            page.goto(url)
            # First load builds/opens the indexes in the server.
            expect(page.get_by_text("2 · Top-5")).to_be_visible(timeout=120_000)
            # Query: the gallery search box narrows the choice to one photo.
            box = page.get_by_label("Search the gallery by name")
            box.fill(query)
            box.press("Enter")
            expect(page.locator(".rr-name").first).to_have_text(f"#1 {query}.png", timeout=30_000)
            # Attack: untargeted top-k, with `steps` steps.
            if linf_eps is not None:
                page.get_by_text("ℓ∞", exact=True).click()
                box = page.get_by_label("ε (ℓ∞, in 1/255)")
                box.fill(str(linf_eps))
                box.press("Enter")
            box = page.get_by_label("steps")
            box.fill(str(steps))
            box.press("Enter")
            page.get_by_role("button", name="Run the attack on both encoders").click()
            expect(page.get_by_text("overlap@5").first).to_be_visible(timeout=180_000)
            expect(page.get_by_text("adversarial query").first).to_be_visible()
            expect(page.get_by_role("button", name="JSON report")).to_be_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
            # Streamlit scrolls inside its main container, not the document: grow the viewport to
            # the content's height so that one screenshot shows the whole page.
            height = page.evaluate("Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))")
            page.set_viewport_size({"width": 1500, "height": min(int(height) + 40, 8000)})
            page.wait_for_timeout(800)  # let images finish painting
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()


def test_browser_runs_a_query_and_an_attack_and_saves_a_screenshot(ui_env, tmp_path):
    _require_browser()
    shot = tmp_path / "ui-screenshot.png"
    with serve([], {**os.environ, **ui_env}, tmp_path / "server.log") as url:
        query_attack_screenshot(url, shot, tmp_path / "chromium-profile")
    assert shot.stat().st_size > 20_000


def test_upload_limits_hold_on_the_server_when_the_widget_is_bypassed(ui_env, tmp_path):
    """ROBRET_UI_MAX_UPLOAD_MB=1 in ui_env. The page's own session uploads a small file through the widget
    (recorded: the server's upload URL and the XSRF header); the same request replayed from outside the
    widget with a 3 MB body is refused by the server (413). A 41-megapixel PNG (a few hundred KB, under the
    byte limit) is refused by the page from its header, before it is decoded."""
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    from PIL import Image as PILImage

    small = tmp_path / "small.png"
    PILImage.new("RGB", (64, 48), (90, 120, 30)).save(small)
    huge = tmp_path / "huge.png"
    PILImage.new("L", (8100, 5100), 128).save(huge)  # 41.3 MP, a few hundred KB compressed
    assert huge.stat().st_size < 2**20
    with serve([], {**os.environ, **ui_env}, tmp_path / "server.log") as url:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1300, "height": 900})
            try:
                page = ctx.new_page()
                page.goto(url)
                expect(page.get_by_text("2 · Top-5")).to_be_visible(timeout=120_000)
                page.get_by_text("an upload", exact=True).click()
                uploads = []
                page.on("request", lambda r: uploads.append(r) if "/_stcore/upload_file/" in r.url and
                        r.method == "PUT" else None)
                page.locator('input[type="file"]').set_input_files(str(small))
                expect(page.get_by_text("upload: small.png").first).to_be_visible(timeout=60_000)
                assert uploads, "the widget's upload request was not seen"
                sent = uploads[0]
                headers = {k: v for k, v in sent.headers.items() if k.lower() == "x-xsrftoken"}
                replay = page.request.put(sent.url, headers=headers, multipart={"file": {
                    "name": "big.png", "mimeType": "image/png", "buffer": b"\x89PNG" + bytes(3 * 2**20)}})
                assert replay.status == 413, (replay.status, replay.text()[:200])
                ok = page.request.put(sent.url, headers=headers, multipart={"file": {
                    "name": "small.png", "mimeType": "image/png", "buffer": small.read_bytes()}})
                assert ok.status < 300, (ok.status, ok.text()[:200])  # the same route takes a small body
                page.locator('input[type="file"]').set_input_files(str(huge))
                expect(page.get_by_text("too many pixels").first).to_be_visible(timeout=60_000)
                assert page.locator('[data-testid="stException"]').count() == 0
            finally:
                ctx.close()


if __name__ == "__main__":
    # The docs screenshot, with the page's real defaults (demo index, bundled models):
    #   python tests/test_ui_browser.py docs/ui-screenshot.png [robret ui options]
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        with serve(sys.argv[2:], dict(os.environ), Path(tmp) / "server.log") as url:
            query_attack_screenshot(url, out, Path(tmp) / "chromium-profile", steps=10, linf_eps=16)
    from PIL import Image  # 256 colours: a third of the bytes in the repository, still readable

    Image.open(out).convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, optimize=True)
    print(out)
