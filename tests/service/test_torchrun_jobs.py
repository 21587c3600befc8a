"""Jobs with `num_processes: 2` end to end (issue 11, "The service"): the real API over HTTP, a
real `tvkd worker` advertising 2 devices (CPU, gloo), whose train stage runs 2 ranks under
torchrun (worker/torchrun.py, worker/rank_train.py), tiny models, the database on SQLite and on
PostgreSQL (the `backend` fixture).

A job asking for more processes than any worker has stays queued; a rank killed with SIGKILL
fails the attempt and the job resumes from its last checkpoint; a cancel stops both ranks.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Proc, WorkerPool, client, start_process, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_worker import checkpoints, events, get_job, submit, train_steps, wait_status

from service.db import make_engine, session_factory
from service.models import Job, MetricPoint

DEVICES = 2


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def start_pair_worker(workers: WorkerPool, env: dict[str, str], home: Path, name: str) -> Proc:
    """A worker that advertises 2 devices, ready."""
    env = {**env, "TVKD_WORKER_DEVICES": str(DEVICES)}
    args = ["worker", "--queues", "default,precompute,train", "--hostname", f"{name}-{os.getpid()}@%h"]
    proc = start_process(name, args, env, home)
    workers.procs.append(proc)  # stopped with the pool
    wait_for(lambda: " ready." in proc.tail(400), timeout=90, what=f"the 2-device worker {name} to be ready")
    assert "2 device(s): consuming default, precompute, train, train.n2" in proc.tail(400)
    return proc


@pytest.fixture(scope="module")
def pair_worker(workers: WorkerPool, service_env: dict[str, str], service_home: Path) -> Proc:
    """One worker that advertises 2 devices (and only it: the pool's other workers are stopped,
    so every stage of these jobs runs here)."""
    for proc in workers.procs:
        proc.stop()
    return start_pair_worker(workers, service_env, service_home, "pair")


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


def losses(db: sessionmaker[Session], job_id: str) -> dict[int, float]:
    """The job's training loss per step."""
    with db() as s:
        rows = s.execute(
            select(MetricPoint.step, MetricPoint.value).where(
                MetricPoint.job_id == job_id, MetricPoint.split == "train", MetricPoint.name == "loss"
            )
        )
        return {step: value for step, value in rows}


def messages(db: sessionmaker[Session], job_id: str) -> list[str]:
    return [e.message for e in events(db, job_id)]


def test_a_two_process_job_succeeds_with_metrics(
    api: str, workers: WorkerPool, pair_worker: Proc, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    job_id = submit(api, tiny_assets, num_processes=2)
    alone = submit(api, tiny_assets)  # the same job in one process
    job = wait_status(api, job_id, {"succeeded"}, timeout=180, pool=workers)
    assert job["error"] is None and job["result"]["steps"] == 6
    said = messages(db, job_id)
    assert any(m == "train runs in 2 processes under torchrun" for m in said), said
    assert any("needs a worker with at least 2 devices" in m for m in said), said
    # The same rows as one process writes: a loss point per step, checkpoints, held-out metrics.
    assert train_steps(db, job_id) == [1, 2, 3, 4, 5, 6]
    assert [c.step for c in checkpoints(db, job_id)][-1] == 6
    with client(api) as c:
        metrics = c.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
    assert {m["split"] for m in metrics} >= {"train", "eval"}
    assert job["result"]["metrics"]["loss"] == pytest.approx(
        next(m["value"] for m in metrics if m["split"] == "train" and m["step"] == 6 and m["name"] == "loss")
    )
    assert (service_home / "artifacts" / job["model_path"] / "config.json").is_file()
    for rank in range(DEVICES):
        assert (run_dir(service_home, job_id) / f"rank{rank}.done").is_file()
    # DDP splits each step's micro-batches over the ranks with the one-process global batch: the
    # loss curve is the one-process job's (float32 sums in another order: rel 1e-4).
    wait_status(api, alone, {"succeeded"}, timeout=180, pool=workers)
    assert not any("torchrun" in m for m in messages(db, alone))
    two, one = losses(db, job_id), losses(db, alone)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    assert [two[k] for k in sorted(two)] == pytest.approx([one[k] for k in sorted(one)], rel=1e-4)


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


def test_kill9_of_one_rank_resumes_from_the_last_checkpoint(
    api: str, workers: WorkerPool, pair_worker: Proc, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    total = 60
    job_id = submit(api, tiny_assets, num_processes=2, max_steps=total, save_every=4)
    wait_for(lambda: checkpoints(db, job_id), timeout=180, what="a first checkpoint")
    pids = rank_pids(service_home, job_id)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = max(train_steps(db, job_id))
    assert killed_at < total, "training ended before the kill: give it more steps"

    job = wait_status(api, job_id, {"succeeded"}, timeout=240, pool=workers)
    assert job["result"]["steps"] == total
    said = messages(db, job_id)
    assert any(m.startswith("a rank crashed") for m in said), said
    resumed = [e for e in events(db, job_id) if e.message.startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].data["step"] >= 4, said
    assert train_steps(db, job_id) == list(range(1, total + 1))  # nothing lost, nothing twice
    assert not any(alive(p) for p in pids)
    with db() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.lease_token is None


def test_cancel_during_a_two_process_train_stops_both_ranks(
    api: str, workers: WorkerPool, pair_worker: Proc, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    job_id = submit(api, tiny_assets, num_processes=2, max_steps=3000, save_every=3)
    wait_for(lambda: checkpoints(db, job_id), timeout=180, what="a first checkpoint")
    pids = rank_pids(service_home, job_id)
    with client(api) as c:
        r = c.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    job = wait_status(api, job_id, {"cancelled"}, timeout=90, pool=workers)
    assert job["error"] is None
    wait_for(lambda: not any(alive(p) for p in pids), timeout=30, what="both ranks to exit")
    ckpts = checkpoints(db, job_id)
    assert ckpts and ckpts[-1].step < 3000
    assert (service_home / "artifacts" / ckpts[-1].path).is_dir()
    # Both ranks stopped cooperatively (no error files), and the stop checkpoint was kept.
    assert not list(run_dir(service_home, job_id).glob("rank*.error"))
    assert any(m.startswith("cancelled") and "kept" in m for m in messages(db, job_id))
    with db() as s:
        assert s.scalar(select(Job.status).where(Job.id == job_id)) == "cancelled"


def test_worker_shutdown_stops_the_ranks_and_another_worker_resumes(
    api: str,
    workers: WorkerPool,
    pair_worker: Proc,
    tiny_assets: dict[str, str],
    db,
    service_home: Path,
    service_env: dict[str, str],
) -> None:
    """Last of the module: it shuts a 2-device worker down (the module's or a second one)."""
    second = start_pair_worker(workers, service_env, service_home, "second")
    total = 60
    job_id = submit(api, tiny_assets, num_processes=2, max_steps=total, save_every=4)
    wait_for(lambda: checkpoints(db, job_id), timeout=180, what="a first checkpoint")
    pids = rank_pids(service_home, job_id)
    with db() as s:
        holder = s.get(Job, job_id).worker  # type: ignore[union-attr]
    leaving, staying = (second, pair_worker) if holder.startswith("second-") else (pair_worker, second)
    leaving.stop()  # SIGTERM: warm shutdown; the ranks stop at a step and save
    assert leaving.popen.returncode == 0, leaving.tail()
    assert not any(alive(p) for p in pids)
    assert any("shutting down" in m for m in messages(db, job_id)), messages(db, job_id)
    job = wait_status(api, job_id, {"succeeded"}, timeout=180, pool=workers)
    assert job["result"]["steps"] == total and train_steps(db, job_id) == list(range(1, total + 1))
    resumed = [e for e in events(db, job_id) if e.message.startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].data["step"] > 0
    starts = [e.data.get("worker") for e in events(db, job_id) if e.message.startswith("train running on")]
    assert starts == [holder, staying_name(staying)]
    staying.stop()


def staying_name(proc: Proc) -> str:
    """The Celery hostname a pool process was started with (its lease holder name)."""
    import socket

    args = list(proc.popen.args)  # type: ignore[arg-type]
    return args[args.index("--hostname") + 1].replace("%h", socket.gethostname())


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
