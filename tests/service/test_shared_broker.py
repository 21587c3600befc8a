"""Two deployments on one Redis database (issue 10, fault 6): each with its own PostgreSQL schema,
API and worker, both on the same broker URL. Queue names carry a prefix derived from the
database (TVKD_QUEUE_PREFIX when set), so each worker receives only its own deployment's
messages: every job of both succeeds at once, and no worker drops a message for a job its
database does not know (which a shared `default` queue made them do, leaving the other
deployment's job waiting for its reconciler)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from conftest import client, wait_for
from deployment import Deployment, deployment, job_body

JOBS_EACH = 2


@pytest.fixture
def two(tmp_path: Path, redis_url: str) -> Iterator[list[Deployment]]:
    with ExitStack() as stack:
        # A long re-send delay: a stolen message would leave its job waiting, not be papered over.
        deps = [
            stack.enter_context(deployment(tmp_path / name, redis_url, TVKD_REQUEUE_AFTER="600"))
            for name in ("a", "b")
        ]
        yield deps


def test_two_deployments_share_a_redis_database_without_stealing(two: list[Deployment]) -> None:
    from service.settings import Settings

    names = {Settings(_env_file=None, database_url=d.database_url).queue_namespace for d in two}  # type: ignore[call-arg]
    assert len(names) == 2  # derived from the two schemas' URLs
    workers = [d.worker(name=f"worker-{i}") for i, d in enumerate(two)]
    ids: list[list[str]] = []
    for dep in two:
        with client(dep.api) as c:
            created = [c.post("/v1/jobs", json=job_body(max_steps=2, save_every=2)) for _ in range(JOBS_EACH)]
        assert all(r.status_code == 201 for r in created), [r.text for r in created]
        ids.append([r.json()["id"] for r in created])

    def all_finished() -> list[dict[str, Any]] | None:
        jobs = []
        for dep, mine in zip(two, ids, strict=True):
            with client(dep.api) as c:
                jobs += [c.get(f"/v1/jobs/{j}").json() for j in mine]
        return jobs if all(j["finished_at"] for j in jobs) else None

    jobs = wait_for(all_finished, timeout=120, interval=0.5, what="both deployments' jobs")
    assert [j["status"] for j in jobs] == ["succeeded"] * (2 * JOBS_EACH), [j["error"] for j in jobs]
    for i, worker in enumerate(workers):
        log = worker.tail(5000)
        assert "no such job" not in log, log
        others = ids[1 - i]
        assert not any(job_id in log for job_id in others), f"worker {i} received the other deployment's job"
