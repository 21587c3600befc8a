"""`tvkd dashboard`: registered with the CLI, and the Streamlit command it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tvkd.cli import build_parser
from tvkd.cli.dashboard import app_path, streamlit_command


def test_registered() -> None:
    args = build_parser().parse_args(
        ["dashboard", "--port", "9999", "--api-url", "http://h:1", "--api-key", "k"]
    )
    assert (args.port, args.host, args.api_url, args.api_key) == (9999, "127.0.0.1", "http://h:1", "k")


def test_runs_the_app_headless_with_this_python() -> None:
    app = app_path()
    assert app.is_file() and app.parent.name == "dashboard"
    cmd = streamlit_command(app, "0.0.0.0", 8600)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(app)]
    assert (
        "--server.headless=true" in cmd and "--server.port=8600" in cmd and "--server.address=0.0.0.0" in cmd
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"TVKD_DASHBOARD_PASSWORD": "short"}, "at least 12 characters"),
        ({"TVKD_DASHBOARD_PASSWORD": "long-enough-password"}, "needs the operator's API key"),
        (
            {"TVKD_DASHBOARD_PASSWORD": "long-enough-password", "TVKD_API_KEY": "k" * 32,
             "TVKD_DASHBOARD_ALLOW_URL": "true"},
            "cannot be combined",
        ),
    ],
)  # fmt: skip
def test_refuses_unsafe_login_settings(env: dict[str, str], problem: str, tmp_path: Path) -> None:
    """A password without a key, a short one, or a visitor-chosen URL with the operator's key:
    `tvkd dashboard` exits 2 with the reason before starting Streamlit."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    run = subprocess.run(
        [sys.executable, "-m", "tvkd.cli", "dashboard", "--port", "1"],
        env={**clean, "TVKD_HOME": str(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert problem in run.stderr
