"""Which API the dashboard talks to, with which key, and what a page shows when that fails.

The URL and key are the visitor's login (dashboard/login.py): the operator's TVKD_API_URL and
the key the visitor entered (or the operator's key behind the dashboard password), held in the
visitor's Streamlit session. `run_page` wraps every page: an API that is down, slow or refuses
the key gives a banner that says what to do, never a stack trace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import streamlit as st

from dashboard import login
from dashboard.api_client import DEFAULT_TIMEOUT, ApiClient, ApiError, ApiUnavailable

DOCS_TTL = 300  # seconds an OpenAPI document is reused: it changes only when the API is upgraded
MODELS_TTL = 30


def timeout() -> float:
    """Seconds a page waits for the API (TVKD_DASHBOARD_TIMEOUT), so a hung API gives a banner."""
    try:
        return max(0.1, float(os.environ.get("TVKD_DASHBOARD_TIMEOUT", DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def refresh_seconds() -> float:
    """How often pages showing running jobs poll the API (TVKD_DASHBOARD_REFRESH)."""
    try:
        return max(1.0, float(os.environ.get("TVKD_DASHBOARD_REFRESH", 3)))
    except ValueError:
        return 3.0


def current() -> tuple[str, str]:
    """The logged-in visitor's API URL and key (app.py's login gate runs before any page)."""
    who = login.current()
    if who is None:
        st.stop()
    assert who is not None
    return who.url, who.key


@st.cache_resource(show_spinner=False, max_entries=8)
def _client(url: str, key: str, wait: float) -> ApiClient:
    # One connection pool per (URL, key) for the server process, shared by its sessions.
    return ApiClient(url, key, timeout=wait)


def client() -> ApiClient:
    url, key = current()
    return _client(url, key, timeout())


@st.cache_data(ttl=DOCS_TTL, show_spinner=False, max_entries=8)
def _openapi(url: str, key: str, wait: float) -> dict[str, Any]:
    return _client(url, key, wait).openapi()


def openapi() -> dict[str, Any]:
    """The API's OpenAPI document: the source of the forms' fields, defaults and help."""
    url, key = current()
    return _openapi(url, key, timeout())


@st.cache_data(ttl=MODELS_TTL, show_spinner=False, max_entries=8)
def _models(url: str, key: str, wait: float) -> list[dict[str, Any]]:
    return _client(url, key, wait).models()


def models() -> list[dict[str, Any]]:
    """GET /v1/models, reused for a few seconds: each form asks for it once per field, per rerun,
    and listing walks the model roots on the server."""
    url, key = current()
    return _models(url, key, timeout())


def show_unavailable(exc: ApiUnavailable) -> None:
    if exc.timed_out:
        what = f"**The TVKD API at {exc.url} is too slow**: {exc.reason}."
        todo = "It may be overloaded; the page tries again when you reload it."
    else:
        what = f"**The TVKD API at {exc.url} cannot be reached**: {exc.reason}."
        todo = (
            "Start it with `tvkd serve` (or `tvkd up`), or have the dashboard's operator point it "
            "at the API: `TVKD_API_URL` or `tvkd dashboard --api-url`."
        )
    st.error(f"{what} {todo}", icon=":material/cloud_off:")


def show_api_error(exc: ApiError) -> None:
    if exc.status == 401:
        who = login.current()
        todo = (
            "The operator's key (`TVKD_API_KEY` behind `TVKD_DASHBOARD_PASSWORD`) is not valid; ask them."
            if who is not None and who.how == "password"
            else "It may have been revoked: log out and log in with a valid key (`tvkd keys create`)."
        )
        st.error(f"**The API refused the key** ({exc.message}). {todo}", icon=":material/key_off:")
    else:
        st.error(f"**The API answered {exc.status} `{exc.code}`**: {exc.message}", icon=":material/error:")


def guarded(body: Callable[[], Any]) -> Any:
    """Run `body`; on an API failure show the banner and stop this run (or fragment run)."""
    try:
        return body()
    except ApiUnavailable as exc:
        show_unavailable(exc)
    except ApiError as exc:
        show_api_error(exc)
    st.stop()


def run_page(body: Callable[[ApiClient], None]) -> None:
    guarded(lambda: body(client()))
