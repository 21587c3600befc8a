"""Fixtures for the service tests: real PostgreSQL and SQLite, real Redis, real API and worker
processes on loopback.

Isolation between concurrent test runs (DEVELOPERS.md): every run claims its own Redis database
number (1..15, claimed atomically in db 0 with SET NX and an expiry) and its own PostgreSQL
schema (`tvkd_t_<random>`, dropped at the end). The `backend` fixture is parametrized, so every
test that touches the database runs once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_URL = os.environ.get("TVKD_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
ALICE, BOB = "sk-alice-" + "a" * 24, "sk-bob-" + "b" * 26
# The API's server secret (service.auth): tests that store keys themselves hash them with it.
SECRET = "test-secret-" + secrets.token_hex(16)
REPO = Path(__file__).resolve().parents[2]


def _services_hint(what: str, exc: Exception) -> str:
    return (
        f"{what} is not reachable ({exc}). The service tests need PostgreSQL on 127.0.0.1:5432 "
        "(database 'test', trust auth) and Redis on 127.0.0.1:6379; README 'Running the tests' "
        "says how to start them."
    )


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis database number of our own for this test run."""
    import redis

    from service.scratch import redis_database

    try:
        with redis_database(REDIS_HOST, REDIS_PORT) as number:
            yield number
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(_services_hint("Redis", exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def redis_url(redis_db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def database_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for this run: a SQLite file or a PostgreSQL schema."""
    import sqlalchemy as sa

    from service.migrate import upgrade
    from service.scratch import postgres_schema

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'tvkd.db'}"
        upgrade(url)
        yield url
        return
    try:
        with postgres_schema(PG_URL) as url:
            upgrade(url)
            yield url
    except sa.exc.OperationalError as exc:
        pytest.fail(_services_hint("PostgreSQL", exc))


@pytest.fixture(scope="session")
def service_home(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp(f"home-{backend}")
    for sub in ("models", "data", "artifacts"):
        (home / sub).mkdir()
    return home


@pytest.fixture(scope="session")
def service_env(service_home: Path, database_url: str, redis_url: str) -> dict[str, str]:
    """The environment of the API and worker processes of this run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    env.update(
        TVKD_HOME=str(service_home),
        TVKD_DATABASE_URL=database_url,
        TVKD_BROKER_URL=redis_url,
        TVKD_ARTIFACT_ROOT=str(service_home / "artifacts"),
        TVKD_MODEL_ROOTS=str(service_home / "models"),
        TVKD_DATA_ROOTS=str(service_home / "data"),
        TVKD_API_KEYS=f"alice={ALICE},bob={BOB}",
        TVKD_SECRET_KEY=SECRET,
        TVKD_HEARTBEAT_SECONDS="0.5",
        TVKD_HEARTBEAT_TIMEOUT="6",
        TVKD_REQUEUE_AFTER="4",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A child process of the test, with its log file for failure messages."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_answering(self, url: str, *, timeout: float = 60, ok=lambda r: r.status_code == 200) -> None:  # type: ignore[no-untyped-def]
        """Poll `url` until `ok(response)`; fail with this process's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok(httpx.get(url, timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            if not self.alive() or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not start ({url}):\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def kill9(self) -> None:
        """SIGKILL the whole process group (the Celery worker forks children)."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


def start_process(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log = log_dir / f"{name}-{secrets.token_hex(3)}.log"
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(
        [sys.executable, "-m", "tvkd.cli", *args], env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return Proc(name, popen, log)


@pytest.fixture(scope="session")
def api(service_env: dict[str, str], service_home: Path) -> Iterator[str]:
    """A real API process (`tvkd serve`) on a free loopback port; yields its base URL."""
    port = free_port()
    proc = start_process(
        "api", ["serve", "--host", "127.0.0.1", "--port", str(port)], service_env, service_home
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_answering(f"{url}/healthz")
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def workers(service_env: dict[str, str], service_home: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(service_env, service_home)
    yield pool
    pool.stop_all()


class WorkerPool:
    """Starts real `tvkd worker` processes on demand; tests kill them as they please."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir, self.procs = env, log_dir, []

    def start(self, name: str = "worker", queues: str = "default,precompute,train") -> Proc:
        args = [
            "worker",
            "--queues",
            queues,
            "--concurrency",
            "1",
            "--hostname",
            f"{name}-{secrets.token_hex(3)}@%h",
        ]
        proc = start_process(name, args, self.env, self.log_dir)
        self.procs.append(proc)
        return proc

    def ensure_one(self) -> Proc:
        for proc in self.procs:
            if proc.alive():
                return proc
        return self.start()

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


def client(api_url: str, key: str = ALICE) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def wait_for(predicate, *, timeout: float, interval: float = 0.25, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate()` until it returns a truthy value; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def tiny_assets(service_home: Path) -> dict[str, str]:
    """A tiny teacher and student (and a reward model, `rm`) under the model root and a learnable
    dataset under the data root; names are relative to the roots, as API users give them."""
    from tvkd.model_prep import build_tiny_model, build_tiny_reward_model
    from tvkd.tasks import generate, split, write_jsonl

    build_tiny_model(service_home / "models" / "teacher", seed=1)
    build_tiny_model(service_home / "models" / "student", seed=2)
    build_tiny_reward_model(service_home / "models" / "rm", seed=3)
    train, held_out = split(generate(48, seed=0), eval_count=8)
    write_jsonl(train + held_out, service_home / "data" / "tasks.jsonl")
    return {"teacher": "teacher", "student": "student", "dataset": "tasks.jsonl"}
