"""End to end in a real browser: Debian's Chromium, driven by Playwright, against real
`tvkd dashboard` (Streamlit) processes that talk to the real API.

- The token inspector: a visitor logs in with the operator's password, opens a finished job's
  token inspector, sees the tokens coloured and the top-3 ψ tokens highlighted; a screenshot is
  taken under the test's temporary folder. With TVKD_UPDATE_SCREENSHOT=1 it also refreshes the
  README's docs/dashboard.png (off by default, so that a test run leaves the working tree clean).
- The login: a fresh visitor gets only the login form, with no API URL field; the operator's
  key appears nowhere in the page, its HTML or the websocket messages, before or after login.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import ALICE, REPO, Jobs, free_port, service

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
INSTALL_HINT = (
    "Chromium is missing at /usr/bin/chromium. Install Debian's package: "
    "`apt-get update && apt-get install -y chromium` (do not run `playwright install`: it downloads "
    "a browser build, which this project's machines cannot fetch)."
)
SCREENSHOT = REPO / "docs" / "dashboard.png"
SCREENSHOT_MAX_BYTES = 150_000
VIEWPORT = {"width": 1280, "height": 900}


def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.fail(INSTALL_HINT)
    return CHROMIUM


PASSWORD = "operator-password-" + "q" * 8


@pytest.fixture
def dashboard_url(api: str, service_env: dict[str, str], service_home: Path) -> Any:
    """A real `tvkd dashboard` process on a free loopback port, logging visitors in with a
    password and acting with ALICE's key (the operator's, which must stay on the server)."""
    port = free_port()
    env = {**service_env, "TVKD_DASHBOARD_PASSWORD": PASSWORD}
    args = ["dashboard", "--host", "127.0.0.1", "--port", str(port), "--api-url", api, "--api-key", ALICE]
    proc = service.start_process("dashboard", args, env, service_home)
    url = f"http://127.0.0.1:{port}"
    proc.wait_answering(f"{url}/_stcore/health", ok=lambda r: r.text.strip() == "ok")
    yield url
    proc.stop()


class Frames:
    """Every websocket message the browser received from the dashboard, as bytes."""

    def __init__(self, page: Any) -> None:
        self.received: list[bytes] = []
        page.on("websocket", lambda ws: ws.on("framereceived", self._add))

    def _add(self, payload: str | bytes) -> None:
        self.received.append(payload.encode() if isinstance(payload, str) else payload)

    def holds(self, secret: str) -> bool:
        return any(secret.encode() in frame for frame in self.received)


def launch(p: Any) -> Any:
    executable = chromium()
    return p.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)


def playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "Playwright is missing: pip install playwright (the driver only; the browser is Debian's)"
        )
    return sync_playwright()


def log_in(page: Any, secret: str, label: str = "Password") -> None:
    page.get_by_label(label, exact=True).fill(secret)
    page.get_by_role("button", name="Log in").click()


def small_png(source: Path, target: Path) -> None:
    """A palette PNG of the screenshot: the README's copy stays small in the repository."""
    from PIL import Image

    with Image.open(source) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        small.save(target, format="PNG", optimize=True)


def test_fresh_visitor_gets_the_login_and_never_the_key(jobs: Jobs, dashboard_url: str) -> None:
    with playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            frames = Frames(page)
            page.goto(f"{dashboard_url}/?job={jobs.tvkd['id']}", wait_until="domcontentloaded")
            page.get_by_text("Log in with the dashboard's password").wait_for(timeout=60_000)
            page.wait_for_timeout(500)  # let the first run's messages arrive
            assert frames.received, "no websocket messages were seen"
            assert not frames.holds(ALICE), "the operator's key reached the browser"
            assert ALICE not in page.content()
            assert page.get_by_label("API URL").count() == 0  # the URL is the operator's
            assert page.get_by_label("Password", exact=True).count() == 1
            assert not frames.holds(jobs.tvkd["id"])  # no page ran: nothing of ALICE's was sent

            log_in(page, "wrong-" + PASSWORD)
            page.get_by_text("Wrong password").wait_for(timeout=30_000)
            assert page.get_by_text("logged in with").count() == 0

            log_in(page, PASSWORD)
            page.get_by_text("logged in with the dashboard password").wait_for(timeout=60_000)
            for _ in range(120):  # the Jobs page runs with the server-side key and lists ALICE's jobs
                if frames.holds(jobs.tvkd["id"]):
                    break
                page.wait_for_timeout(250)
            assert frames.holds(jobs.tvkd["id"]), "the Jobs page did not list the key's jobs"
            assert not frames.holds(ALICE) and ALICE not in page.content()
            assert page.get_by_label("API URL").count() == 0
        finally:
            browser.close()


def test_token_inspector_in_chromium(jobs: Jobs, dashboard_url: str, tmp_path: Path) -> None:
    job_id = jobs.tvkd["id"]
    with playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            frames = Frames(page)
            page.goto(f"{dashboard_url}/inspector?job={job_id}&k=1", wait_until="domcontentloaded")
            log_in(page, PASSWORD)
            page.wait_for_selector(".tvkd-response .tvkd-tok", timeout=60_000)
            page.get_by_text("Rejected").first.wait_for(timeout=30_000)

            sides = page.locator(".tvkd-response")
            assert sides.count() == 2, "chosen and rejected side by side"
            tokens = page.locator(".tvkd-tok")
            n = tokens.count()
            assert n > 6
            colours = {tokens.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(n)}
            assert len(colours) >= 3, f"tokens should be coloured by their ψ, got {colours}"

            # The three largest-ψ tokens of each response: outlined and ranked 1..3.
            for side in range(2):
                top = sides.nth(side).locator(".tvkd-top")
                assert top.count() == 3
                outline = top.first.evaluate("e => getComputedStyle(e).outlineStyle")
                assert outline == "solid"
                ranks = sides.nth(side).locator(".tvkd-rank").all_inner_texts()
                assert sorted(ranks) == ["1", "2", "3"]
            title = tokens.first.get_attribute("title") or ""
            assert "ψ_t:" in title and "V(s_t):" in title and "id:" in title

            page.wait_for_timeout(500)  # let the last elements settle before the picture
            shot = tmp_path / "inspector.png"
            page.screenshot(path=str(shot), full_page=False)
            assert not frames.holds(ALICE)
        finally:
            browser.close()

    assert shot.stat().st_size > 10_000
    tmp_small = tmp_path / "dashboard.png"
    small_png(shot, tmp_small)
    assert tmp_small.stat().st_size <= SCREENSHOT_MAX_BYTES, tmp_small.stat().st_size
    if os.environ.get("TVKD_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_small, SCREENSHOT)
