"""`tvkd dashboard`: the Streamlit dashboard (dashboard/app.py), headless, talking to the API at
TVKD_API_URL with the key TVKD_API_KEY (or `--api-url` / `--api-key`, or a `.env` file).

It runs `python -m streamlit run dashboard/app.py` as a child of this same Python, so the
dashboard sees the same installed packages, and passes the API settings in its environment.
Needs the dashboard extra: `pip install 'tvkd[dashboard]'`.
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

DEFAULT_PORT = 8501
DASHBOARD_EXTRA_HINT = "the dashboard needs the dashboard extra: pip install 'tvkd[dashboard]'"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="run the Streamlit dashboard (jobs, curves, token inspector)",
        description="Run the TVKD dashboard, a Streamlit app that talks to the REST API over HTTP.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-url", default=None, help="API base URL (default: $TVKD_API_URL)")
    parser.add_argument("--api-key", default=None, help="API key (default: $TVKD_API_KEY)")
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


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        print(f"tvkd dashboard: {DASHBOARD_EXTRA_HINT}", file=sys.stderr)
        return 2
    url, key = api_settings(args.api_url, args.api_key)
    if not key:
        print(
            "tvkd dashboard: no API key (TVKD_API_KEY or --api-key); enter one in the sidebar",
            file=sys.stderr,
        )
    env = {**os.environ, "TVKD_API_URL": url, "TVKD_API_KEY": key}
    print(f"tvkd dashboard: http://{args.host}:{args.port} (API {url})", file=sys.stderr, flush=True)
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
