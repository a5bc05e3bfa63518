"""The page in a real headless Chromium: upload an X-ray through the file input, read the answer.

Needs Debian's /usr/bin/chromium and the Playwright Python client (``tools/install_browser.sh``
installs both; ``playwright install`` is never used, it downloads browsers from a CDN).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
from conftest import free_port, one_torch_thread  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "pneumo" / "sample_data" / "chest_xray"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: run tools/install_browser.sh", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: run tools/install_browser.sh")


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def server(trained_run: Path):
    """uvicorn on loopback with a free port, in a thread; stopped when the module's tests end."""
    import uvicorn

    from pneumo.serve.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(trained_run / "model"), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_reads_an_uploaded_xray(server: str, tmp_path: Path) -> None:
    image = sorted(SAMPLE.glob("test/PNEUMONIA/*.jpeg"))[0]
    expected = httpx.post(
        f"{server}/api/predict",
        params={"heatmap": "false"},
        files={"file": (image.name, image.read_bytes(), "image/jpeg")},
        timeout=60,
    ).json()
    outside, console_errors = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on(
                "request",
                lambda req: None if req.url.startswith((server, "data:", "blob:")) else outside.append(req.url),
            )
            page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
            page.goto(server + "/")
            sync_api.expect(page.locator("#model-info")).to_contain_text("efficientnet_lite0")
            sync_api.expect(page.locator("#drop")).to_contain_text("Drop a JPEG, PNG or DICOM chest X-ray here")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            label = page.inner_text("#label")
            probability = page.inner_text("#probability")
            term = page.inner_text("#probability-term")
            trained_on = page.inner_text("#trained-on")
            threshold = page.inner_text("#threshold")
            page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
            heat_width = page.eval_on_selector("#heatmap", "img => img.naturalWidth")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # a bad file shows the server's reason instead of a result
            bad = tmp_path / "notes.jpeg"
            bad.write_text("not an x-ray")
            page.set_input_files("#file", str(bad))
            sync_api.expect(page.locator("#status")).to_contain_text("415")
            sync_api.expect(page.locator("#status")).to_contain_text("not a JPEG or PNG")
            assert page.locator("#result").is_hidden()
        finally:
            browser.close()
    assert label == expected["label"]
    # one meaning: p(PNEUMONIA) against the threshold, in words, whatever the label
    p, t = expected["probabilities"]["PNEUMONIA"], expected["threshold"]
    side = "at or above" if p >= t else "below"
    assert term == "p(PNEUMONIA)"
    assert probability == f"{100 * p:.1f} % \u2013 {side} the {100 * t:.1f} % needed to call PNEUMONIA"
    assert f"{100 * t:.1f} % on p(PNEUMONIA)" in threshold
    assert trained_on.startswith("Trained on ") and "training images of chest_xray" in trained_on
    assert heat_width == 224  # the sample image's own width
    assert outside == [], f"the page fetched from outside the server: {outside}"
    assert not [e for e in console_errors if "415" not in e], console_errors
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_page_without_javascript_says_it_needs_it(server: str) -> None:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(java_script_enabled=False)
            page.goto(server + "/")
            notice = page.locator("#needs-script")
            sync_api.expect(notice).to_be_visible()
            sync_api.expect(notice).to_contain_text("needs JavaScript")
            assert page.locator("#drop").is_hidden()  # a file picker that could send nothing
            assert "Loading" not in page.inner_text("body")
        finally:
            browser.close()
