"""The deployment that bench/drills.py attacks: a real API process and real worker processes on a
PostgreSQL scratch schema reached through a TCP proxy (so the drills can close the database),
a Redis database of their own, tiny models and a small dataset in a temporary home; and the
HTTP client that counts the API's 5xx answers.

Every worker connects to PostgreSQL with the application name `app_name` (PGAPPNAME), so the
drills terminate exactly these connections and never another program's.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))  # the tests' TCP proxy, reused as is
from tcp_proxy import TcpProxy  # noqa: E402

PG_URL = os.environ.get("TVKD_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS = ("127.0.0.1", 6379)
KEY = "sk-drill-" + "d" * 24
# Short timeouts so a drill's recovery takes seconds, a generous re-send bound so that ten kills
# landing on one job do not fail it (the bound has its own test).
SETTINGS = {
    "TVKD_HEARTBEAT_SECONDS": "0.5",
    "TVKD_HEARTBEAT_TIMEOUT": "4",
    "TVKD_REQUEUE_AFTER": "4",
    "TVKD_MAX_RESENDS": "50",
}
JOB = {
    "teacher": "teacher",
    "student": "student",
    "dataset": "tasks.jsonl",
    "alpha": 0.7,
    "beta": 0.1,
    "hyperparameters": {"max_steps": 30, "save_every": 5, "batch_size": 4, "learning_rate": 1e-3,
                        "num_samples": 2},
}  # fmt: skip
DONE_RE = re.compile(r"Task tvkd\.(\w+)\[(job_[0-9a-f]{24}):\w+:\w+\] succeeded in [\d.]+s: '([^']*)'")
COMPLETED = re.compile(r"^(succeeded|cancelled|advanced to \w+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_assets(home: Path) -> None:
    from tvkd.model_prep import build_tiny_model
    from tvkd.tasks import generate, split, write_jsonl

    for sub in ("models", "data", "artifacts", "logs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    build_tiny_model(home / "models" / "teacher", seed=1)
    build_tiny_model(home / "models" / "student", seed=2)
    train, held_out = split(generate(64, seed=0), eval_count=8)
    write_jsonl(train + held_out, home / "data" / "tasks.jsonl")


@dataclass
class Answers:
    """What the API answered the drill's client: 5xx answers (503 with Retry-After, the
    documented answer while the database is away, counted apart), refused connections."""

    status: Counter[str] = field(default_factory=Counter)

    def add(self, response: httpx.Response | None) -> None:
        if response is None:
            self.status["no answer"] += 1
        elif response.status_code == 503 and response.headers.get("Retry-After"):
            self.status["503+Retry-After"] += 1
        elif response.status_code >= 500:
            self.status["5xx"] += 1


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    proxy: TcpProxy
    redis_db: int
    app_name: str
    api_url: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    answers: Answers = field(default_factory=Answers)

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.home / "logs" / f"{name}-{secrets.token_hex(3)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tvkd.cli", *args], env=env, cwd=ROOT, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return proc, log

    def start_api(self) -> None:
        port = int(self.api_url.rsplit(":", 1)[1]) if self.api_url else free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api, _ = self._start("api", ["serve", "--port", str(port)], self.env)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.2)

    def kill_api(self) -> None:
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGKILL)
            self.api.wait()

    def start_worker(self) -> subprocess.Popen[bytes]:
        args = ["worker", "--concurrency", "1", "--hostname", f"drill-{secrets.token_hex(3)}@%h"]
        proc, log = self._start("worker", args, {**self.env, "PGAPPNAME": self.app_name})
        self.workers.append(proc)
        self.logs.append(log)
        return proc

    def alive_workers(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.workers if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.workers:
            self.kill(proc, signal.SIGTERM)
        self.kill_api()

    # ------------------------------------------------------------------ the API, counted

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response | None:
        try:
            r = httpx.request(method, f"{self.api_url}{path}", headers={"Authorization": f"Bearer {KEY}",
                              **kw.pop("headers", {})}, timeout=30, **kw)  # fmt: skip
        except httpx.HTTPError:
            r = None
        self.answers.add(r)
        return r

    def submit(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            r = self.call("POST", "/v1/jobs", json=JOB)
            assert r is not None and r.status_code == 201, r.text if r is not None else "no answer"
            ids.append(r.json()["id"])
        return ids

    def job(self, job_id: str) -> dict[str, Any] | None:
        r = self.call("GET", f"/v1/jobs/{job_id}")
        return r.json() if r is not None and r.status_code == 200 else None

    def wait(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any] | None]:
        """Poll until every job finished or `timeout` s passed; the last view of each."""
        deadline = time.monotonic() + timeout
        seen: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
        while True:
            for job_id in ids:
                if not (seen[job_id] or {}).get("finished_at"):
                    seen[job_id] = self.job(job_id) or seen[job_id]
            if all((j or {}).get("finished_at") for j in seen.values()) or time.monotonic() > deadline:
                return seen
            time.sleep(0.5)

    def training(self, ids: list[str]) -> bool:
        return any(
            (j := self.job(i)) and j["status"] == "training" and j["progress"]["done"] > 0 for i in ids
        )

    # ------------------------------------------------------------------ what happened

    def model_digest(self, job: dict[str, Any]) -> str | None:
        """sha256 over the final model's tensors (names sorted), or None without a model."""
        if job.get("status") != "succeeded" or not job.get("model_path"):
            return None
        from safetensors.torch import load_file

        weights = load_file(self.env["TVKD_ARTIFACT_ROOT"] + "/" + job["model_path"] + "/model.safetensors")
        digest = hashlib.sha256()
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(weights[name].contiguous().view(-1).numpy().tobytes())
        return digest.hexdigest()

    def completions(self) -> Counter[tuple[str, str]]:
        """(job, stage) → how many times a worker finished that stage and moved the job on (its
        task returned "advanced to …" or "succeeded"): more than once is work done twice."""
        done: Counter[tuple[str, str]] = Counter()
        for log in self.logs:
            for stage, job_id, result in DONE_RE.findall(log.read_text(errors="replace")):
                if COMPLETED.match(result):
                    done[(job_id, stage)] += 1
        return done

    def terminate_connections(self, seconds: float) -> int:
        """pg_terminate_backend on every connection of the workers, again and again for `seconds`."""
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL)
        killed = 0
        try:
            with engine.connect() as conn:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    rows = conn.execute(
                        sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = :n AND pid <> pg_backend_pid()"),
                        {"n": self.app_name},
                    ).all()  # fmt: skip
                    conn.commit()
                    killed += len(rows)
                    time.sleep(0.05)
        finally:
            engine.dispose()
        return killed


@contextmanager
def stack(home: Path) -> Iterator[Stack]:
    """A migrated scratch schema behind a TCP proxy, a Redis database, the assets; the API running."""
    from sqlalchemy.engine import make_url

    from service.migrate import upgrade
    from service.scratch import postgres_schema, redis_database

    make_assets(home)
    pg = make_url(PG_URL)
    with redis_database(*REDIS) as redis_db, postgres_schema(PG_URL) as url:
        upgrade(url)
        with TcpProxy((pg.host or "127.0.0.1", pg.port or 5432)) as proxy:
            proxied = url.replace(f"@{pg.host}:{pg.port}/", f"@127.0.0.1:{proxy.port}/")
            env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
            env.update(
                TVKD_HOME=str(home), TVKD_DATABASE_URL=proxied,
                TVKD_BROKER_URL=f"redis://{REDIS[0]}:{REDIS[1]}/{redis_db}",
                TVKD_ARTIFACT_ROOT=str(home / "artifacts"), TVKD_MODEL_ROOTS=str(home / "models"),
                TVKD_DATA_ROOTS=str(home / "data"), TVKD_API_KEYS=f"drill={KEY}",
                TVKD_SECRET_KEY="drill-secret-" + secrets.token_hex(16), PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **SETTINGS,
            )  # fmt: skip
            s = Stack(home, env, proxy, redis_db, app_name=f"tvkd-drill-{secrets.token_hex(4)}")
            try:
                s.start_api()
                yield s
            finally:
                s.stop_all()
