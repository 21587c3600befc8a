"""A worker's PostgreSQL connections dropped during training (issue 10, fault 1): a real
`tvkd serve` and a real `tvkd worker` on a scratch PostgreSQL schema; while the job trains, the
test terminates every connection of the worker (`pg_terminate_backend`, what an administrator,
a failover or a restart does) over and over for a few seconds, three times. The worker retries
each transient error with backoff (service.db.in_transaction) and the job succeeds with every
training step recorded once; no event or error shows SQL.

The worker's connections are told apart by their application name (PGAPPNAME, read by libpq),
so the test never touches another run's connections to the shared server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import PG_URL, client, wait_for
from deployment import Deployment, deployment, job_body

STEPS = 40
BLINKS, BLINK_SECONDS = 3, 3.0


@pytest.fixture
def dep(tmp_path: Path, redis_url: str) -> Iterator[Deployment]:
    with deployment(tmp_path, redis_url) as d:
        yield d


def terminate_for(engine: sa.Engine, app_name: str, seconds: float) -> int:
    """Terminate every backend named `app_name`, again and again for `seconds`; how many."""
    killed = 0
    deadline = time.monotonic() + seconds
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            killed += len(
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": app_name},
                ).all()
            )
            conn.commit()
            time.sleep(0.02)
    return killed


def test_dropped_connections_during_training_do_not_fail_the_job(dep: Deployment) -> None:
    worker = dep.worker()
    with client(dep.api) as c:
        r = c.post("/v1/jobs", json=job_body(max_steps=STEPS, save_every=4))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def job() -> dict[str, Any]:
            return c.get(f"/v1/jobs/{job_id}").json()

        def training() -> bool:
            now = job()
            assert now["status"] not in {"failed", "cancelled"}, (now, worker.tail())
            return now["status"] == "training" and now["progress"]["done"] > 0

        wait_for(training, timeout=120, interval=0.1, what="training to start")
        engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        killed = []
        try:
            for _ in range(BLINKS):
                killed.append(terminate_for(engine, dep.app_name, BLINK_SECONDS))
                time.sleep(1.0)
        finally:
            engine.dispose()
        assert sum(killed) >= BLINKS, killed  # the worker's connections were there and were cut

        done = wait_for(lambda: job()["finished_at"] and job(), timeout=180, interval=0.25, what="the job")
        events = c.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()
    assert done["status"] == "succeeded", (done["error"], worker.tail(80))
    assert done["result"]["steps"] == STEPS
    messages = [e["message"] for e in events["data"]]
    # Each stage ran once, in the same worker: the errors were retried, not left to the reconciler
    # (without the retries a failed write ends the stage; the job is failed, or resumed elsewhere
    # after its lease expires when even the failure could not be written).
    # One known gap: a blink that hits a stage's own bookkeeping write (not retried one by one,
    # StageContext.record) hands the job back at once, with an event saying so, and the stage
    # resumes from its checkpoint in a worker; it is never left to a lease expiry.
    handed_back = sum("the database was unavailable during train" in m for m in messages)
    assert handed_back <= 1, messages
    assert sum(m.startswith("train running on") for m in messages) == 1 + handed_back, messages
    assert not [e for e in events["data"] if e["level"] == "error"], messages
    text = str(done) + str(events)
    for sql in ("SELECT", "UPDATE", "INSERT", "[SQL:", "psycopg"):
        assert sql not in text
    assert "transient database error" in worker.tail(3000)  # it was retried, not avoided
