"""`tvkd up` starts the API, a worker and the dashboard on embedded defaults (no Redis, no
database server), and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import REPO, free_port, wait_for


def _interruptible() -> None:
    """Ctrl-C as from a terminal: a shell without job control starts background commands with
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so a suite run from such
    a loop (`cmd &`, nohup) saw `tvkd up` ignore the test's SIGINT. The child starts with the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_with_home(home: Path) -> list[int]:
    """PIDs whose environment names this TVKD_HOME (the processes `tvkd up` started)."""
    marker = f"TVKD_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_up_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    env.update(TVKD_HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    api_port, dash_port = free_port(), free_port()
    out = tmp_path / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "tvkd.cli", "up", "--port", str(api_port), "--dashboard-port", str(dash_port)],
        env=env, cwd=REPO, stdout=out.open("wb"), stderr=subprocess.STDOUT, preexec_fn=_interruptible,
    )  # fmt: skip
    try:

        def ready() -> bool:
            assert up.poll() is None, "tvkd up exited early"
            try:
                api_ok = httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=2).status_code == 200
                dash_ok = (
                    httpx.get(f"http://127.0.0.1:{dash_port}/_stcore/health", timeout=2).status_code == 200
                )
                return api_ok and dash_ok
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=90, what="tvkd up's API and dashboard")
        # `tvkd up` says so once it is up (and watching its children): Ctrl-C from then on.
        wait_for(lambda: "Ctrl-C stops everything" in out.read_text(), timeout=30, what="tvkd up's banner")
        key = (home / "api_key").read_text().strip()
        r = httpx.get(f"http://127.0.0.1:{api_port}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["object"] == "list"
        assert (home / "tvkd.db").is_file()  # the embedded SQLite database
        children = set(processes_with_home(home)) - {up.pid}
        assert len(children) >= 3, children  # api, worker, dashboard (and their own children)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        wait_for(lambda: not processes_with_home(home), timeout=30, what="every started process to exit")
        for port in (api_port, dash_port):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                raise AssertionError(f"port {port} still answers")
            except httpx.HTTPError:
                pass
    finally:
        if up.poll() is None:
            up.kill()
        for pid in processes_with_home(home):
            os.kill(pid, signal.SIGKILL)
        print(out.read_text(errors="replace")[-3000:])


def test_ctrl_c_while_starting_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    env.update(TVKD_HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out = tmp_path / "up.log"
    ports = ["--port", str(free_port()), "--dashboard-port", str(free_port())]
    up = subprocess.Popen(
        [sys.executable, "-m", "tvkd.cli", "up", *ports],
        env=env, cwd=REPO, stdout=out.open("wb"), stderr=subprocess.STDOUT, preexec_fn=_interruptible,
    )  # fmt: skip
    try:
        # Interrupt once `up` and its three children exist, before the API is ready (it takes seconds).
        wait_for(lambda: len(processes_with_home(home)) >= 4, timeout=30, what="the children to start")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) in (0, 130)
        wait_for(lambda: not processes_with_home(home), timeout=30, what="every started process to exit")
    finally:
        if up.poll() is None:
            up.kill()
        for pid in processes_with_home(home):
            os.kill(pid, signal.SIGKILL)
        print(out.read_text(errors="replace")[-3000:])


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """Found: `tvkd demo --port P` with another tvkd API already on P took that API's /readyz for
    its own and submitted to it ('401 invalid_api_key'). Now the port is checked first: exit 1 naming
    it, and no process is left."""
    import socket

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    env.update(TVKD_HOME=str(home), PYTHONPATH=str(REPO))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv in (["up", "--port", str(port), "--no-dashboard"],
                     ["up", "--port", "0", "--dashboard-port", str(port)]):  # fmt: skip
            run = subprocess.run(
                [sys.executable, "-m", "tvkd.cli", *argv], env=env, cwd=tmp_path,
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert run.returncode == 1, run.stderr[-2000:]
            assert f"port {port} on 127.0.0.1 is in use" in run.stderr, run.stderr[-2000:]
            assert processes_with_home(home) == []
