"""Jobs with `num_processes: 2` end to end (issue 11, "The service"): the real API over HTTP, a
real `tvkd worker` advertising 2 devices (CPU, gloo), whose train stage runs 2 ranks under
torchrun (worker/torchrun.py, worker/rank_train.py), tiny models, the database on SQLite and on
PostgreSQL (the `backend` fixture).

A job asking for more processes than any worker has stays queued; a rank killed with SIGKILL
fails the attempt and the job resumes from its last checkpoint; a cancel stops both ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Proc, WorkerPool, client, start_process, wait_for
from sqlalchemy.orm import Session, sessionmaker
from test_worker import events, get_job, submit, wait_status

from service.db import make_engine, session_factory

DEVICES = 2


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def pair_worker(workers: WorkerPool, service_env: dict[str, str], service_home: Path) -> Proc:
    """One worker that advertises 2 devices (and only it: the pool's other workers are stopped,
    so every stage of these jobs runs here)."""
    for proc in workers.procs:
        proc.stop()
    env = {**service_env, "TVKD_WORKER_DEVICES": str(DEVICES)}
    args = ["worker", "--queues", "default,precompute,train", "--hostname", f"pair-{os.getpid()}@%h"]
    proc = start_process("pair-worker", args, env, service_home)
    workers.procs.append(proc)  # stopped with the pool
    wait_for(lambda: " ready." in proc.tail(400), timeout=90, what="the 2-device worker to be ready")
    assert "2 device(s): consuming default, precompute, train, train.n2" in proc.tail(400)
    return proc


def run_dir(service_home: Path, job_id: str) -> Path:
    return service_home / "artifacts" / "jobs" / job_id / "torchrun"


def rank_pids(service_home: Path, job_id: str) -> list[int]:
    folder = run_dir(service_home, job_id)
    return [int((folder / f"rank{r}.pid").read_text()) for r in range(DEVICES)]


def alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except OSError:
        return False
    return state != "Z"


def messages(db: sessionmaker[Session], job_id: str) -> list[str]:
    return [e.message for e in events(db, job_id)]


def test_a_job_asking_for_more_processes_than_any_worker_has_stays_queued(
    api: str, workers: WorkerPool, pair_worker: Proc, tiny_assets: dict[str, str], db
) -> None:
    job_id = submit(api, tiny_assets, num_processes=DEVICES + 1)
    wait_for(
        lambda: any("needs a worker with at least 3 devices" in m for m in messages(db, job_id)),
        timeout=120,
        what="the job to reach its train stage",
    )
    # Longer than TVKD_REQUEUE_AFTER (4 s): the reconciler finds its message waiting in
    # train.n3 and leaves it there; nothing takes it, nothing fails it.
    time.sleep(8)
    job = get_job(api, job_id)
    assert (job["status"], job["stage"], job["error"]) == ("queued", "train", None)
    assert not any(m.startswith("train running on") for m in messages(db, job_id))
    with client(api) as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    wait_status(api, job_id, {"cancelled"}, timeout=30, pool=workers)


def test_how_an_attempt_ended_is_read_from_the_ranks_files(tmp_path: Path) -> None:
    """A rank's own error fails the job with that rank's code; a silent rank (killed) or only
    process-group errors of the survivors (a peer died) are a crash, resumed; else the result."""
    import json

    from worker.errors import RankCrashed, RankFailed
    from worker.rank_train import done_file, error_file
    from worker.torchrun import _outcome

    def error(rank: int, code: str, communication: bool) -> None:
        record = {"type": "E", "message": f"boom {rank}", "code": code, "communication": communication}
        error_file(tmp_path, rank).write_text(json.dumps(record))

    done_file(tmp_path, 0).write_text("ok")
    with pytest.raises(RankCrashed, match=r"rank\(s\) \[1\] of 2"):
        _outcome(tmp_path, 2, -9, None)  # rank 1 killed: no error, no done
    error(0, "internal_error", communication=True)  # rank 0 saw its peer go
    with pytest.raises(RankCrashed):
        _outcome(tmp_path, 2, 1, None)
    error(1, "data_error", communication=False)
    with pytest.raises(RankFailed, match="rank 1 of 2: E: boom 1") as failed:
        _outcome(tmp_path, 2, 1, None)
    assert failed.value.code == "data_error"
    for rank in (0, 1):
        error_file(tmp_path, rank).unlink()
        done_file(tmp_path, rank).write_text("ok")
    with pytest.raises(RankCrashed):
        _outcome(tmp_path, 2, 0, None)  # every rank done but rank 0 sent no result
