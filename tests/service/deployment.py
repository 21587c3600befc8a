"""A whole deployment for a test, on PostgreSQL: its own scratch schema, home folder (tiny
teacher and student, a small dataset), a real API process, and real worker processes on demand.

The session fixtures of conftest.py give one API per backend for a whole run; tests that cut a
deployment's database connections, run two deployments side by side, or need settings of their
own (a shorter heartbeat timeout, a re-send bound) make one of these instead. Its worker
processes are named in PostgreSQL by PGAPPNAME (`app_name`), so a test can find (and cut) their
connections without touching another run's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import ALICE, PG_URL, Proc, free_port, start_process

from service.migrate import upgrade
from service.scratch import postgres_schema

ASSETS = {"teacher": "teacher", "student": "student", "dataset": "tasks.jsonl"}


def job_body(**hyperparameters: Any) -> dict[str, Any]:
    hp = {"max_steps": 6, "save_every": 2, "batch_size": 4, "learning_rate": 1e-3, **hyperparameters}
    return {**ASSETS, "alpha": 0.7, "beta": 0.1, "hyperparameters": hp}


@dataclass
class Deployment:
    home: Path
    database_url: str
    env: dict[str, str]
    api: str = ""
    app_name: str = ""
    procs: list[Proc] = field(default_factory=list)

    def worker(self, queues: str = "default,precompute,train", *extra: str, name: str = "worker") -> Proc:
        """A `tvkd worker` process (concurrency 1) on `queues`; `extra` flags such as --no-reconciler."""
        args = ["worker", "--queues", queues, "--concurrency", "1"]
        args += ["--hostname", f"{name}-{secrets.token_hex(3)}@%h", *extra]
        proc = start_process(name, args, {**self.env, "PGAPPNAME": self.app_name}, self.home)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def _assets(home: Path) -> None:
    from tvkd.model_prep import build_tiny_model
    from tvkd.tasks import generate, split, write_jsonl

    for sub in ("models", "data", "artifacts"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    build_tiny_model(home / "models" / "teacher", seed=1)
    build_tiny_model(home / "models" / "student", seed=2)
    train, held_out = split(generate(48, seed=0), eval_count=8)
    write_jsonl(train + held_out, home / "data" / "tasks.jsonl")


@contextmanager
def deployment(home: Path, redis_url: str, **settings: str) -> Iterator[Deployment]:
    """A migrated scratch schema, the assets under `home` and a running API; `settings` are extra
    TVKD_* variables (e.g. TVKD_MAX_RESENDS="1"). Every process is stopped at the end."""
    _assets(home)
    with postgres_schema(PG_URL) as url:
        upgrade(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
        env.update(
            TVKD_HOME=str(home),
            TVKD_DATABASE_URL=url,
            TVKD_BROKER_URL=redis_url,
            TVKD_ARTIFACT_ROOT=str(home / "artifacts"),
            TVKD_MODEL_ROOTS=str(home / "models"),
            TVKD_DATA_ROOTS=str(home / "data"),
            TVKD_API_KEYS=f"alice={ALICE}",
            TVKD_SECRET_KEY="test-secret-" + secrets.token_hex(16),
            TVKD_HEARTBEAT_SECONDS="0.5",
            TVKD_HEARTBEAT_TIMEOUT="30",
            TVKD_REQUEUE_AFTER="30",
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        env.update(settings)
        dep = Deployment(home, url, env, app_name=f"tvkd-test-{secrets.token_hex(4)}")
        try:
            port = free_port()
            api = start_process("api", ["serve", "--port", str(port)], env, home)
            dep.procs.append(api)
            dep.api = f"http://127.0.0.1:{port}"
            api.wait_answering(f"{dep.api}/readyz")
            yield dep
        finally:
            dep.stop()
