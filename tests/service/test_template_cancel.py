"""Cancelling a job while its chat template loops (a real API and a real worker): the cancel
interrupts the template within about a second, the job ends `cancelled`, and the worker takes
the next job. The worker's template time limit is 120 s here, so a cancel that had to wait for
the limit (as it did before tvkd.sandbox.stop_when) would not end the job within the test."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WorkerPool, client
from test_worker import get_job, submit, wait_status

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture
def slow_limit_worker(
    service_env: dict[str, str], service_home: Path, workers: WorkerPool
) -> Iterator[WorkerPool]:
    """The only worker of the deployment while the test runs: its template limit is 120 s."""
    for proc in workers.procs:  # idle session workers would take the job with the 5 s default
        proc.stop()
    pool = WorkerPool({**service_env, "TVKD_TEMPLATE_SECONDS": "120"}, service_home)
    pool.start("slow-template")
    yield pool
    pool.stop_all()


@pytest.fixture
def looping_assets(service_home: Path, tiny_assets: dict[str, str]) -> dict[str, str]:
    """A model whose chat template loops (teacher and student) and conversational rows."""
    folder = service_home / "models" / "looping_chat"
    if not folder.exists():
        shutil.copytree(service_home / "models" / tiny_assets["student"], folder)
        (folder / "chat_template.jinja").write_text(LOOP)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
            "chosen": [{"role": "assistant", "content": str(2 * i)}],
            "rejected": [{"role": "assistant", "content": str(2 * i + 1)}],
        }
        for i in range(8)
    ]
    (service_home / "data" / "looping_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"teacher": "looping_chat", "student": "looping_chat", "dataset": "looping_chat.jsonl"}


def test_cancel_while_the_chat_template_loops(
    api: str, slow_limit_worker: WorkerPool, looping_assets: dict[str, str], tiny_assets: dict[str, str]
) -> None:
    job_id = submit(api, looping_assets, max_steps=2)
    wait_status(api, job_id, {"validating"}, timeout=60, pool=slow_limit_worker)
    # `validating` is also shown while the job waits in the queue: wait until the worker has
    # claimed it (started_at is set at the claim; under load that took more than 2 s in a full run).
    deadline = time.monotonic() + 60
    while get_job(api, job_id)["started_at"] is None:
        assert time.monotonic() < deadline, "the worker did not claim the job within 60 s"
        time.sleep(0.2)
    time.sleep(2)  # the worker is inside the template's loop by now (tiny models load in < 1 s)
    assert get_job(api, job_id)["status"] == "validating"
    t0 = time.monotonic()
    with client(api) as c:
        r = c.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled"), r.text
    job = wait_status(api, job_id, {"cancelled"}, timeout=30, pool=slow_limit_worker)
    assert time.monotonic() - t0 < 30  # far below the 120 s template limit
    assert job["error"] is None
    with client(api) as c:
        messages = [e["message"] for e in c.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert any("while a chat template ran" in m for m in messages), messages
    # The worker is responsive: it takes the next job and runs it to the end.
    assert all(p.alive() for p in slow_limit_worker.procs)
    next_id = submit(api, tiny_assets, max_steps=2, save_every=2)
    wait_status(api, next_id, {"succeeded"}, timeout=180, pool=slow_limit_worker)
