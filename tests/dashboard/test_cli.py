"""`tvkd dashboard`: registered with the CLI, and the Streamlit command it runs."""

from __future__ import annotations

import sys

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
