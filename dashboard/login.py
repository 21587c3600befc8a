"""Who may use the dashboard, and with which API key: its login.

Two ways in, chosen by the operator:

- **Own key** (the default): each visitor types their own API key; the dashboard checks it against
  the API and keeps it in that visitor's Streamlit session only (server-side, gone on reload or
  "Log out"). A server-side key (TVKD_API_KEY) is not used at all.
- **Password** (TVKD_DASHBOARD_PASSWORD set, with a server-side key TVKD_API_KEY): visitors type
  the operator's password and then act with the server-side key, which stays in this process:
  it is never put in a widget, the page or a message to the browser.

The API URL is the operator's (TVKD_API_URL). A visitor may type another one only in own-key mode
and only when the operator allows it (TVKD_DASHBOARD_ALLOW_URL=true); a server-side key is never
sent to a URL a visitor chose.
"""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, field

import streamlit as st

from dashboard.api_client import ApiClient, ApiError, ApiUnavailable

DEFAULT_URL = "http://127.0.0.1:8000"
PASSWORD_ENV, ALLOW_URL_ENV = "TVKD_DASHBOARD_PASSWORD", "TVKD_DASHBOARD_ALLOW_URL"
SESSION_KEY = "tvkd:login"  # st.session_state: the visitor's Login, server-side only
MIN_PASSWORD = 12
FAILED_LOGIN_DELAY = 1.0  # seconds a wrong password or key waits before its answer


@dataclass(frozen=True)
class Login:
    """A logged-in visitor: the API they talk to and the key they act with (never shown)."""

    url: str
    key: str = field(repr=False)
    how: str  # "key" (their own) or "password" (the operator's server-side key)


def configured_url() -> str:
    return (os.environ.get("TVKD_API_URL") or DEFAULT_URL).strip().rstrip("/")


def password() -> str:
    return os.environ.get(PASSWORD_ENV, "")


def server_key() -> str:
    """The operator's key, used only behind a password."""
    return os.environ.get("TVKD_API_KEY", "").strip() if password() else ""


def allow_url() -> bool:
    """Whether a visitor may choose the API URL: never in password mode."""
    allowed = os.environ.get(ALLOW_URL_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    return allowed and not password()


def current() -> Login | None:
    login = st.session_state.get(SESSION_KEY)
    return login if isinstance(login, Login) else None


def logout() -> None:
    st.session_state.pop(SESSION_KEY, None)


def _check_key(url: str, key: str, timeout: float) -> str | None:
    """None when the API accepts `key`, else what to tell the visitor."""
    client = ApiClient(url, key, timeout=timeout)
    try:
        client.list_jobs(limit=1)
    except ApiUnavailable as exc:
        return f"The TVKD API at {exc.url} cannot be reached: {exc.reason}."
    except ApiError as exc:
        if exc.status == 401:
            time.sleep(FAILED_LOGIN_DELAY)
            return "The API refused this key."
        return f"The API answered {exc.status} `{exc.code}`: {exc.message}"
    finally:
        client.close()
    return None


def _password_form() -> None:
    with st.form("tvkd:login-form", clear_on_submit=True):
        entered = st.text_input("Password", type="password", key="tvkd:login-password")
        submitted = st.form_submit_button("Log in")
    if not submitted:
        return
    if not server_key():
        st.error("The operator set a dashboard password but no API key (TVKD_API_KEY).")
        return
    if not hmac.compare_digest(entered.encode(), password().encode()):
        time.sleep(FAILED_LOGIN_DELAY)
        st.error("Wrong password.", icon=":material/key_off:")
        return
    st.session_state[SESSION_KEY] = Login(configured_url(), server_key(), "password")
    st.rerun()


def _key_form(timeout: float) -> None:
    with st.form("tvkd:login-form", clear_on_submit=True):
        url = configured_url()
        if allow_url():
            url = st.text_input("API URL", value=url, key="tvkd:login-url").strip().rstrip("/")
        entered = st.text_input(
            "Your API key", type="password", key="tvkd:login-key", help="Kept in this browser session only."
        ).strip()
        submitted = st.form_submit_button("Log in")
    if not submitted:
        return
    if not entered:
        st.error("Enter your API key.")
        return
    if not url.startswith(("http://", "https://")):
        st.error("The API URL must start with http:// or https://.")
        return
    problem = _check_key(url, entered, timeout)
    if problem:
        st.error(problem, icon=":material/key_off:")
        return
    st.session_state[SESSION_KEY] = Login(url, entered, "key")
    st.rerun()


def gate(timeout: float) -> Login:
    """The visitor's Login; without one, show the login form and stop this run."""
    login = current()
    if login is not None:
        return login
    st.title("TVKD dashboard")
    if password():
        st.caption("Log in with the dashboard's password.")
        _password_form()
    else:
        st.caption("Log in with your API key (`tvkd keys create`); it stays in this browser session.")
        _key_form(timeout)
    st.stop()
    raise AssertionError("unreachable")  # st.stop() raises


def sidebar(login: Login) -> None:
    """Who is logged in, to which API, and a way out."""
    how = "the dashboard password" if login.how == "password" else "your API key"
    st.caption(f"API {login.url} · logged in with {how}")
    if st.button("Log out", key="tvkd:logout"):
        logout()
        st.rerun()
