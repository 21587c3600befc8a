"""`tvkd up`: the API, one worker and the dashboard, as child processes, on embedded defaults.

Every setting comes from the environment (or `.env`) as for the single commands; with nothing
set, all state lives under TVKD_HOME (SQLite, artifacts, the embedded broker). An API key is
made on first use and kept in TVKD_HOME/api_key, so the CLI client and the dashboard can use it.
Ctrl-C (or SIGTERM) stops every process this command started, and nothing else.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the API, a worker and the dashboard together (embedded defaults)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="interface of the API and dashboard (127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="API port (8000; 0 = any free port)")
    p.add_argument(
        "--dashboard-port", type=port_number, default=8501, help="dashboard port (8501; 0 = any free)"
    )
    p.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    p.set_defaults(func=run)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535; else argparse's error names the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected an integer 0-65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535 (0 = any free port)")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise RuntimeError when something listens on host:port already (another tvkd up, say):
    otherwise its /readyz would be taken for this stack's API."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(
                f"port {port} on {host} is in use ({exc.strerror}): stop what listens there, or pick "
                "another with --port/--dashboard-port (0 = any free port)"
            ) from None


def local_api_key(home: Path) -> str:
    """The embedded setup's key: from TVKD_API_KEY, else TVKD_HOME/api_key (made once, 0600)."""
    if os.environ.get("TVKD_API_KEY"):
        return os.environ["TVKD_API_KEY"]
    path = home / "api_key"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("sk-local-" + secrets.token_hex(16))
    return path.read_text().strip()


@dataclass
class Stack:
    """The processes of one `tvkd up`; `stop()` ends exactly these (their process groups)."""

    home: Path
    api_url: str
    api_key: str
    dashboard_url: str | None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: Path = Path()

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_stack(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dashboard_port: int | None = 8501,
    timeout: float = 120,
    workers: int = 1,
) -> Stack:
    """Start API, `workers` worker processes (and dashboard); return once the API answers /readyz."""
    import httpx

    from service.settings import Settings

    settings = Settings()
    home = settings.home_dir
    key = local_api_key(home)
    if port:
        check_port_free(host, port)
    port = port or free_port(host)
    api_url = f"http://{host}:{port}"
    env = dict(os.environ)
    keys = [k for k in settings.api_keys if k]
    if not any(k.split("=", 1)[-1] == key for k in keys):
        keys.append(f"local={key}")
    env.update(TVKD_HOME=str(home), TVKD_API_KEYS=",".join(keys), TVKD_API_URL=api_url, TVKD_API_KEY=key)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        "api": ["serve", "--host", host, "--port", str(port)],
        "worker": ["worker"],
        **{f"worker-{i}": ["worker", "--hostname", f"worker{i}@%h"] for i in range(2, workers + 1)},
    }
    dashboard_url = None
    if dashboard_port is not None:
        if dashboard_port:
            check_port_free(host, dashboard_port)
        dashboard_port = dashboard_port or free_port(host)
        commands["dashboard"] = ["dashboard", "--host", host, "--port", str(dashboard_port)]
        dashboard_url = f"http://{host}:{dashboard_port}"
    stack = Stack(home, api_url, key, dashboard_url, logs=logs)
    deadline = time.monotonic() + timeout
    try:
        # Ctrl-C is held back while the children are made and recorded, so that stop() below
        # knows every child that exists (an interrupt between a fork and its record would orphan
        # one); it takes effect right after. (A caught signal is reset to default in the children.)
        interrupted: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        try:
            for name, args in commands.items():
                with open(logs / f"{name}.log", "ab") as log:
                    stack.procs[name] = subprocess.Popen(
                        [sys.executable, "-m", "tvkd.cli", *args], env=env, stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: stop() ends it and its children
                    )  # fmt: skip
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        while True:
            try:
                if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                    return stack
            except httpx.HTTPError:
                pass
            dead = [n for n, ok in stack.alive().items() if not ok]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0]} exited" if dead else f"the API was not ready within {timeout:.0f} s"
                raise RuntimeError(f"{why}; its log:\n{stack.tail(dead[0] if dead else 'api')}")
            time.sleep(0.3)
    except BaseException:  # a failed start, or Ctrl-C while starting: leave nothing behind
        stack.stop()
        raise


def run(args: argparse.Namespace) -> int:
    try:
        stack = start_stack(
            host=args.host, port=args.port, dashboard_port=None if args.no_dashboard else args.dashboard_port
        )
    except KeyboardInterrupt:
        print("\nstopped while starting", file=sys.stderr)
        return 130
    except ImportError:
        print("tvkd up needs the service extras: pip install 'tvkd[service,dashboard]'", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"tvkd up: {exc}", file=sys.stderr)
        return 1
    print(
        f"API        {stack.api_url}   (key in {stack.home / 'api_key'}; "
        f"export TVKD_API_URL={stack.api_url} TVKD_API_KEY=…)"
    )
    if stack.dashboard_url:
        print(f"dashboard  {stack.dashboard_url}   (log in with the key in {stack.home / 'api_key'})")
    print(f"state      {stack.home}   logs in {stack.logs}\nCtrl-C stops everything.")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while all(stack.alive().values()):
            time.sleep(1)
        dead = [n for n, ok in stack.alive().items() if not ok]
        print(f"{dead[0]} exited; stopping the rest. Its log:\n{stack.tail(dead[0])}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping…", file=sys.stderr)
        return 0
    finally:
        stack.stop()
