"""The dashboard's login (dashboard/login.py) against the real API: a fresh visitor sees only the
login form and no key; their own key (checked by the API) or the operator's password lets them
in; the API URL is the operator's unless the operator allows another (never with a password).
The browser test (test_browser.py) checks the same from outside: the page and websocket."""

from __future__ import annotations

from typing import Any

import pytest
from dashboard_helpers import ALICE, APP, BOB, Jobs, no_exceptions, texts

from dashboard.login import SESSION_KEY

PASSWORD = "operator-password-" + "p" * 8


def fresh_visit() -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=60)
    return at.run()


def labels(at: Any) -> list[str]:
    return [w.label for w in at.text_input]


def widget_values(at: Any) -> list[str]:
    return [str(w.value) for w in at.text_input]


def log_in(at: Any, field: str, secret: str) -> Any:
    at.text_input(key=field).input(secret)
    return at.button[0].click().run()  # the form's "Log in"


@pytest.fixture
def operator_env(api: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The operator configured the API URL and (to show it is not handed out) a server-side key."""
    monkeypatch.setenv("TVKD_API_URL", api)
    monkeypatch.setenv("TVKD_API_KEY", ALICE)
    monkeypatch.delenv("TVKD_DASHBOARD_PASSWORD", raising=False)
    monkeypatch.delenv("TVKD_DASHBOARD_ALLOW_URL", raising=False)
    monkeypatch.setenv("TVKD_DASHBOARD_TIMEOUT", "30")
    return api


def test_fresh_visitor_sees_only_the_login(jobs: Jobs, operator_env: str) -> None:
    at = fresh_visit()
    no_exceptions(at)
    assert labels(at) == ["Your API key"]  # no API URL field, no prefilled key
    assert ALICE not in widget_values(at) and all(v == "" for v in widget_values(at))
    assert "Log in with your API key" in texts(at)
    assert not at.dataframe and jobs.tvkd["id"] not in texts(at)  # no page ran
    assert SESSION_KEY not in at.session_state


def test_own_key_login(jobs: Jobs, operator_env: str) -> None:
    at = log_in(fresh_visit(), "tvkd:login-key", "sk-not-a-key-" + "x" * 20)
    no_exceptions(at)
    assert "The API refused this key" in " ".join(e.value for e in at.error)
    assert SESSION_KEY not in at.session_state and not at.dataframe

    at = log_in(at, "tvkd:login-key", BOB)
    no_exceptions(at)
    login = at.session_state[SESSION_KEY]
    assert (login.url, login.key, login.how) == (operator_env, BOB, "key")
    assert "logged in with your API key" in texts(at)
    # BOB sees his own jobs (none of ALICE's): the server-side key was not used.
    listed = str(at.dataframe[0].value["job"].tolist()) if at.dataframe else ""
    assert jobs.tvkd["id"] not in texts(at) and jobs.tvkd["id"] not in listed


def test_password_login_acts_with_the_operator_key(jobs: Jobs, operator_env: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TVKD_DASHBOARD_PASSWORD", PASSWORD)
    monkeypatch.setenv("TVKD_DASHBOARD_ALLOW_URL", "true")  # ignored with a password
    at = fresh_visit()
    assert labels(at) == ["Password"]
    at = log_in(at, "tvkd:login-password", PASSWORD[:-1])
    assert "Wrong password" in " ".join(e.value for e in at.error)
    assert SESSION_KEY not in at.session_state

    at = log_in(at, "tvkd:login-password", PASSWORD)
    no_exceptions(at)
    assert at.session_state[SESSION_KEY].how == "password"
    assert ALICE not in widget_values(at) and ALICE not in texts(at)
    listed = str(at.dataframe[0].value["job"].tolist())
    assert jobs.tvkd["id"] in listed  # ALICE's jobs, through the key that stays on the server

    at.button(key="tvkd:logout").click().run()
    assert SESSION_KEY not in at.session_state and labels(at) == ["Password"]


def test_url_is_the_operators_unless_allowed(jobs: Jobs, operator_env: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TVKD_DASHBOARD_ALLOW_URL", "true")
    at = fresh_visit()
    assert labels(at) == ["API URL", "Your API key"]
    at.text_input(key="tvkd:login-url").input(operator_env + "/")
    at = log_in(at, "tvkd:login-key", BOB)
    no_exceptions(at)
    assert at.session_state[SESSION_KEY].url == operator_env
