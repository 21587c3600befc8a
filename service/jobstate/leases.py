"""A worker's writes: the lease (taken with one conditional UPDATE, kept alive by heartbeats), the
start of a stage, its data columns and progress while the lease is held, and its end (the next
stage, or back to the queue)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from service.jobstate.core import (
    DATA_COLUMNS,
    JobStateError,
    StaleMessage,
    add_event,
    finish,
    move_status,
    requeue,
    update_held,
)
from service.models import Job, utcnow
from service.statemachine import STAGES, TERMINAL, Status


@dataclass
class Claim:
    """What `start_stage` found: the job and the lease token when the stage may run, else why not."""

    job: Job | None
    token: str | None
    reason: str = ""


def start_stage(
    session: Session, job_id: str, stage: str, worker: str, *, timeout: float, output_dir: str
) -> Claim:
    """Take the job's lease to run `stage` and show the stage's status. Nothing runs (and nothing
    but a cancel is written) when the job is unknown, terminal, held by a live worker, or cancelled
    while it waited; a job at another stage (a stale or duplicate message) raises StaleMessage,
    so that the caller's transaction rolls back the lease this took."""
    job = session.get(Job, job_id)
    if job is None:
        return Claim(None, None, "no such job")
    if job.status == Status.WAITING:  # its first stage is sent when the jobs it names succeed
        return Claim(None, None, "it is waiting for the jobs it names")
    holder = job.worker if job.lease_token else None
    token = acquire_lease(session, job_id, worker, timeout=timeout)
    session.refresh(job)
    if token is None:
        return Claim(
            None, None, f"it is {job.status}" if job.lease_token is None else f"{job.worker} holds it"
        )
    if job.stage != stage:
        raise StaleMessage(f"the job is at {job.stage}")  # the caller rolls back the lease just taken
    if job.cancel_requested:
        finish(session, job, Status.CANCELLED, message=f"cancelled before the {job.stage} stage started")
        return Claim(None, None, "cancelled")
    if holder:
        add_event(
            session,
            job.id,
            f"{worker} takes the job over from {holder}, whose heartbeat stopped",
            level="warning",
            stage=job.stage,
            data={"previous_worker": holder},
        )
    if job.status != Status.CANCELLING:
        move_status(job, STAGES[job.stage].status)
    job.started_at = job.started_at or utcnow()
    job.output_dir = job.output_dir or output_dir
    job.progress_done, job.progress_total, job.eta_seconds = 0, 0, None
    add_event(
        session,
        job.id,
        f"{job.stage} running on {worker}",
        stage=job.stage,
        data={"worker": worker, "attempt": job.attempts},
    )
    return Claim(job, token)


def held(session: Session, job_id: str, token: str) -> Job | None:
    """The job, locked, while `token` still holds its lease; None when the lease was lost."""
    job = session.get(Job, job_id, populate_existing=True, with_for_update=True)
    return job if job is not None and job.lease_token == token else None


def record(session: Session, job_id: str, token: str, **values: Any) -> bool:
    """Set data columns (precompute_key, spec, result) while `token` holds the lease."""
    if not set(values) <= DATA_COLUMNS:
        raise JobStateError(f"not data columns: {sorted(set(values) - DATA_COLUMNS)}")
    return update_held(session, job_id, token, **values)


def set_progress(session: Session, job_id: str, token: str, done: int, total: int, eta: float | None) -> bool:
    """The running stage's progress (units done of total, seconds left)."""
    return update_held(session, job_id, token, progress_done=done, progress_total=total, eta_seconds=eta)


def advance(session: Session, job: Job, to: str, *, message: str, data: dict[str, Any] | None = None) -> None:
    """The job's stage is done: move it to stage `to` (one of the stage's `next`), show `queued`,
    release the lease and record the send time; the caller sends the message after the commit."""
    if to not in STAGES[job.stage].next:
        raise JobStateError(f"stage {job.stage} cannot be followed by {to!r} (only {STAGES[job.stage].next})")
    add_event(session, job.id, message, stage=job.stage, data=data)
    job.stage = to
    job.resends = 0
    requeue(job)
    processes = ((job.spec or {}).get("train") or {}).get("num_processes", 1)
    if STAGES[to].sized and isinstance(processes, int) and processes > 1:
        add_event(
            session,
            job.id,
            f"the {to} stage needs a worker with at least {processes} devices (queue {STAGES[to].queue}.n"
            f"{processes}); the job stays queued until one takes it",
            stage=to,
            data={"num_processes": processes},
        )


def hand_back(session: Session, job: Job, *, message: str, data: dict[str, Any] | None = None) -> None:
    """The worker stops (it is shutting down): the job waits for its stage again, to resume."""
    add_event(session, job.id, message, level="warning", stage=job.stage, data=data)
    requeue(job)


def acquire_lease(session: Session, job_id: str, worker: str, *, timeout: float) -> str | None:
    """Take the job for this worker if nobody holds a live lease. Returns the token or None.

    One conditional UPDATE, so two workers racing for the same job cannot both win, on SQLite
    and PostgreSQL alike.
    """
    token = secrets.token_hex(16)
    now = utcnow()
    stale = now - timedelta(seconds=timeout)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(Job.status.not_in(TERMINAL))
        .where(or_(Job.lease_token.is_(None), Job.heartbeat_at.is_(None), Job.heartbeat_at < stale))
        .values(lease_token=token, worker=worker, heartbeat_at=now, attempts=Job.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return token if result.rowcount == 1 else None


def heartbeat(session: Session, job_id: str, token: str) -> bool:
    """Refresh the lease; False when it was lost (taken over after a timeout, or job finished)."""
    return update_held(session, job_id, token, heartbeat_at=utcnow())
