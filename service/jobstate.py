"""Job state changes shared by the API and the workers. Every change of a job's status goes
through here, so that the rules of DESIGN.md hold in one place:

- statuses: validating → queued → precomputing → training → evaluating → succeeded, with
  failed / cancelling / cancelled; terminal states (succeeded, failed, cancelled) are final;
- a job is run by at most one worker at a time: a worker takes a *lease* (a random token written
  with a conditional UPDATE) and keeps it alive with heartbeats; a lease whose heartbeat is older
  than the timeout may be taken over (the reconciler re-enqueues such jobs);
- every change is recorded as an event.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.models import TERMINAL, Job, JobEvent, utcnow

# Status a job shows while each stage runs.
STAGE_STATUS = {
    "validate": "validating",
    "precompute": "precomputing",
    "reference": "training",
    "train": "training",
    "evaluate": "evaluating",
}
# A job in one of these has not started any work yet: cancel ends it at once.
NOT_STARTED = frozenset({"validating", "queued"})


class JobStateError(Exception):
    """A transition the rules do not allow (the API answers 409)."""


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    stage: str | None = None,
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, level=level, stage=stage, data=data or {})
    session.add(event)
    return event


def finish(
    session: Session,
    job: Job,
    status: str,
    *,
    message: str,
    error: tuple[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Move a job to a terminal status (no-op if it already is in one)."""
    if job.status in TERMINAL:
        return
    if status not in TERMINAL:
        raise JobStateError(f"{status} is not a terminal status")
    job.status = status
    job.finished_at = utcnow()
    job.lease_token = None
    job.eta_seconds = None
    if error:
        job.error_code, job.error_message = error
    add_event(
        session, job.id, message, level="error" if status == "failed" else "info", stage=job.stage, data=data
    )


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel: a job that has not started ends `cancelled` now; a running one goes `cancelling`
    and its worker stops at the next step (keeping its last checkpoint)."""
    if job.status in TERMINAL:
        raise JobStateError(f"job {job.id} is already {job.status}")
    job.cancel_requested = True
    if job.status in NOT_STARTED and job.lease_token is None:
        finish(session, job, "cancelled", message="cancelled before it started")
    elif job.status != "cancelling":
        job.status = "cancelling"
        add_event(session, job.id, "cancel requested; the worker stops at its next step", stage=job.stage)
    return job


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
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release_lease(session: Session, job_id: str, token: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(lease_token=None)
        .execution_options(synchronize_session=False)
    )


def stale_jobs(session: Session, *, heartbeat_timeout: float, requeue_after: float) -> list[Job]:
    """Jobs the reconciler must re-enqueue: running with a dead heartbeat, or waiting in a queue
    (not started) for longer than `requeue_after` since they were last sent (lost broker message)."""
    now = utcnow()
    dead: datetime = now - timedelta(seconds=heartbeat_timeout)
    lost: datetime = now - timedelta(seconds=requeue_after)
    rows = session.scalars(
        select(Job).where(
            Job.status.not_in(TERMINAL),
            or_(
                (Job.lease_token.is_not(None)) & (Job.heartbeat_at < dead),
                (Job.lease_token.is_(None)) & (Job.enqueued_at.is_not(None)) & (Job.enqueued_at < lost),
            ),
        )
    )
    return list(rows)
