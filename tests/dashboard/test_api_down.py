"""An API that is down, hangs, or refuses the key: every page shows a banner that says what is
wrong and what to do, never a stack trace."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from dashboard_helpers import free_port, no_exceptions, open_page

PAGES = ("jobs", "new_job", "job", "inspector", "compare")


def banner(at) -> str:  # type: ignore[no-untyped-def]
    return " ".join(str(e.value) for e in at.error)


@pytest.mark.parametrize("page", PAGES)
def test_api_down(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("TVKD_API_URL", url)
    monkeypatch.setenv("TVKD_API_KEY", "sk-any")
    at = open_page(page, job="job_000000000000000000000000")
    no_exceptions(at)
    text = banner(at)
    assert f"The TVKD API at {url} cannot be reached" in text
    assert "connection refused" in text and "tvkd serve" in text and "TVKD_API_URL" in text


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections and never answers: a hung API."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    server.close()


def test_api_too_slow(silent_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVKD_API_URL", silent_server)
    monkeypatch.setenv("TVKD_API_KEY", "sk-any")
    monkeypatch.setenv("TVKD_DASHBOARD_TIMEOUT", "0.5")
    at = open_page("jobs")
    no_exceptions(at)
    assert "is too slow**: no answer within 0.5 s" in banner(at)


def test_key_refused(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVKD_API_URL", api)
    monkeypatch.setenv("TVKD_API_KEY", "sk-not-a-key")
    at = open_page("jobs")
    no_exceptions(at)
    assert "The API refused the key" in banner(at) and "log in with a valid key" in banner(at)
