"""Re-sends are bounded (issue 10, fault 7): a job whose worker dies every time it runs a stage is
re-sent by the reconciler at most TVKD_MAX_RESENDS times; the next time it would be, the job
fails with error code `retries_exhausted`, the attempts in its failure event. Real API, real
workers (SIGKILLed while training), PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import client, wait_for
from deployment import Deployment, deployment, job_body


@pytest.fixture
def dep(tmp_path: Path, redis_url: str) -> Iterator[Deployment]:
    # One re-send allowed; a worker silent for 2 s is dead (the reconciler looks every second).
    with deployment(tmp_path, redis_url, TVKD_MAX_RESENDS="1", TVKD_HEARTBEAT_TIMEOUT="2") as d:
        yield d


def events_of(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return c.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["data"]


def train_starts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["message"].startswith("train running on")]


def test_a_stage_whose_worker_keeps_dying_fails_retries_exhausted(dep: Deployment) -> None:
    dep.worker("default", name="reconciler")  # validates, evaluates, and re-sends dead jobs
    trainer = dep.worker("precompute,train", "--no-reconciler", name="trainer")
    with client(dep.api) as c:
        r = c.post("/v1/jobs", json=job_body(max_steps=2000, save_every=50))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        for attempt in (1, 2):  # the first run, then the one re-send allowed

            def training(attempt: int = attempt) -> bool:
                job = c.get(f"/v1/jobs/{job_id}").json()
                assert not job["finished_at"], job
                return len(train_starts(events_of(c, job_id))) == attempt and job["progress"]["done"] > 0

            wait_for(training, timeout=90, interval=0.2, what=f"training attempt {attempt}")
            trainer.kill9()
            trainer = dep.worker("precompute,train", "--no-reconciler", name="trainer")

        def finished() -> dict[str, Any] | None:
            job = c.get(f"/v1/jobs/{job_id}").json()
            return job if job["finished_at"] else None

        job = wait_for(finished, timeout=60, interval=0.2, what="the job to fail")
        events = events_of(c, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "retries_exhausted", job["error"]
    assert "re-sent 1 times" in job["error"]["message"] and "ran 2 times" in job["error"]["message"]
    failure = events[-1]
    assert failure["level"] == "error" and failure["data"]["code"] == "retries_exhausted"
    attempts = failure["data"]["attempts"]
    assert len(attempts) == 2 and len({a["worker"] for a in attempts}) == 2, attempts
    assert [a["attempt"] for a in attempts] == sorted(a["attempt"] for a in attempts)
    # The third trainer, started after the second kill, never ran the stage.
    assert len(train_starts(events)) == 2
