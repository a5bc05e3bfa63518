"""The page in headless Chromium against a server that needs a token and keeps an audit trail:
the page says a token is needed, takes it, reads an X-ray, and the reader's "disagree" lands in the database.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from conftest import SAMPLE_ROOT, one_torch_thread
from test_audit_record import make_model_folder
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS, free_port

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: run tools/install_browser.sh")
TOKEN = "correct-horse-battery"


@pytest.mark.timeout(300)
def test_reader_disagrees_on_the_page_and_the_row_is_there(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run tools/install_browser.sh")
    import uvicorn

    from pneumo.audit.record import AuditTrail
    from pneumo.serve.app import create_app

    with one_torch_thread():
        model = make_model_folder(tmp_path / "run")
        db = tmp_path / "audit.sqlite"
        app = create_app(model, audit=AuditTrail.open(db, model), token=TOKEN)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start within 30 s"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        image = sorted(SAMPLE_ROOT.glob("test/PNEUMONIA/*.jpeg"))[0]
        try:
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page()
                    page.goto(base + "/")
                    sync_api.expect(page.locator("#access")).to_be_visible()
                    sync_api.expect(page.locator("#access")).to_contain_text("needs an access token")
                    page.fill("#access-token", TOKEN)
                    page.click("#access button[type=submit]")
                    sync_api.expect(page.locator("#model-info")).to_contain_text("efficientnet_lite0")
                    sync_api.expect(page.locator("#audit-note")).to_contain_text("audit trail")
                    page.set_input_files("#file", str(image))
                    sync_api.expect(page.locator("#feedback")).to_be_visible(timeout=60_000)
                    label = page.inner_text("#label")
                    page.click("#feedback-disagree")
                    other = page.eval_on_selector("#feedback-label", "s => s.value")
                    page.fill("#feedback-note", "reader saw consolidation")
                    page.click("#feedback-send")
                    sync_api.expect(page.locator("#feedback-status")).to_contain_text("Recorded: disagreed")
                finally:
                    browser.close()
        finally:
            srv.should_exit = True
            thread.join(timeout=10)
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "select r.decision, f.agreed, f.true_label, f.note from feedback f join readings r on r.id = f.reading_id"
        ).fetchall()
    assert other != label and other in ("NORMAL", "PNEUMONIA")
    assert rows == [(label, 0, other, "reader saw consolidation")]
