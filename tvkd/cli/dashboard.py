"""`tvkd dashboard`: the Streamlit dashboard (dashboard/app.py), headless, talking to the API at
TVKD_API_URL (or `--api-url`, or a `.env` file), behind a login (dashboard/login.py):

- by default each visitor logs in with their own API key, kept in their session only; no key of
  the operator's reaches the dashboard process;
- with TVKD_DASHBOARD_PASSWORD (at least 12 characters) visitors log in with that password and act
  with the operator's key (TVKD_API_KEY / `--api-key`), which never leaves the server process.

Visitors may type another API URL only with `--allow-any-api-url` (TVKD_DASHBOARD_ALLOW_URL), and
never in password mode. It runs `python -m streamlit run dashboard/app.py` as a child of this same
Python, so the dashboard sees the same installed packages, and passes these settings in its
environment. Needs the dashboard extra: `pip install 'tvkd[dashboard]'`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tvkd.cli.api_settings import api_settings
from tvkd.cli.up import port_number

DEFAULT_PORT = 8501
MIN_PASSWORD = 12  # as dashboard.login.MIN_PASSWORD (the dashboard package is an optional extra)
DASHBOARD_EXTRA_HINT = "the dashboard needs the dashboard extra: pip install 'tvkd[dashboard]'"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="run the Streamlit dashboard (jobs, curves, token inspector)",
        description="Run the TVKD dashboard, a Streamlit app that talks to the REST API over HTTP.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})"
    )
    parser.add_argument("--api-url", default=None, help="API base URL (default: $TVKD_API_URL)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="the operator's API key, used only behind TVKD_DASHBOARD_PASSWORD (default: $TVKD_API_KEY)",
    )
    parser.add_argument(
        "--allow-any-api-url",
        action="store_true",
        default=None,
        help="let visitors type another API URL at login (own-key login only; $TVKD_DASHBOARD_ALLOW_URL)",
    )
    parser.set_defaults(func=run)


def app_path() -> Path:
    spec = importlib.util.find_spec("dashboard")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the dashboard package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "app.py"


def streamlit_command(app: Path, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.headless=true",
        f"--server.address={host}",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        # A served dashboard does not edit itself: no file watcher (it also costs CPU and inotify).
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=minimal",
    ]


def login_settings(allow_flag: bool | None) -> tuple[str, bool]:
    """The dashboard password and whether visitors may choose the API URL (flag, env, `.env`)."""
    try:
        from service.settings import Settings  # reads .env as well as the environment

        settings = Settings()
        password, allow = settings.dashboard_password, settings.dashboard_allow_url
    except ImportError:
        password = os.environ.get("TVKD_DASHBOARD_PASSWORD", "")
        allow = os.environ.get("TVKD_DASHBOARD_ALLOW_URL", "").lower() in {"1", "true", "yes", "on"}
    return password, bool(allow if allow_flag is None else allow_flag)


def login_problem(password: str, key: str, allow_url: bool) -> str | None:
    """Why these login settings are refused, or None."""
    if not password:
        return None
    if len(password) < MIN_PASSWORD:
        return f"TVKD_DASHBOARD_PASSWORD must be at least {MIN_PASSWORD} characters"
    if not key:
        return "TVKD_DASHBOARD_PASSWORD needs the operator's API key (TVKD_API_KEY or --api-key)"
    if allow_url:
        return (
            "TVKD_DASHBOARD_ALLOW_URL cannot be combined with TVKD_DASHBOARD_PASSWORD: the operator's key "
            "would go to a URL a visitor chose"
        )
    return None


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        print(f"tvkd dashboard: {DASHBOARD_EXTRA_HINT}", file=sys.stderr)
        return 2
    url, key = api_settings(args.api_url, args.api_key)
    password, allow_url = login_settings(args.allow_any_api_url)
    problem = login_problem(password, key, allow_url)
    if problem:
        print(f"tvkd dashboard: {problem}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k not in {"TVKD_API_KEY", "TVKD_DASHBOARD_PASSWORD"}}
    env.update(TVKD_API_URL=url, TVKD_DASHBOARD_ALLOW_URL="true" if allow_url else "false")
    if password:  # the operator's key reaches the dashboard process only behind a password
        env.update(TVKD_API_KEY=key, TVKD_DASHBOARD_PASSWORD=password)
        how = "the dashboard password (TVKD_DASHBOARD_PASSWORD)"
    else:
        how = "each visitor's own API key"
    where = f"http://{args.host}:{args.port}"
    print(f"tvkd dashboard: {where} (API {url}; login with {how})", file=sys.stderr, flush=True)
    child = subprocess.Popen(streamlit_command(app_path(), args.host, args.port), env=env)

    def stop(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        try:
            return child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            return 130


if __name__ == "__main__":  # python -m tvkd.cli.dashboard …, for a checkout without the command registered
    _parser = argparse.ArgumentParser(prog="tvkd")
    register(_parser.add_subparsers(dest="command"))
    _args = _parser.parse_args(["dashboard", *sys.argv[1:]])
    raise SystemExit(_args.func(_args))
