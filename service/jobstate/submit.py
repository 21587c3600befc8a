"""The API's writes: a new job, a cancel request, the send time of its stage."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.jobstate.core import JobStateError, add_event, finish, move_status
from service.models import Job, utcnow
from service.statemachine import FIRST_STAGE, NOT_STARTED, STAGES, TERMINAL, Status


def new_job(*, waiting: bool = False, **columns: Any) -> Job:
    """A submitted job: waiting for its first stage, with its send time set (committed with the
    row, so a message lost before it is sent is re-sent by the reconciler); or, `waiting` for the
    jobs it names (service.dependencies), `waiting` and unsent."""
    if waiting:
        return Job(status=Status.WAITING, stage=FIRST_STAGE, enqueued_at=None, **columns)
    return Job(status=STAGES[FIRST_STAGE].status, stage=FIRST_STAGE, enqueued_at=utcnow(), **columns)


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel: a job that has not started ends `cancelled` now; a running one goes `cancelling`
    and its worker stops at the next step (keeping its last checkpoint)."""
    if job.status in TERMINAL:
        raise JobStateError(f"job {job.id} is already {job.status}")
    job.cancel_requested = True
    if job.status in NOT_STARTED and job.lease_token is None:
        finish(session, job, Status.CANCELLED, message="cancelled before it started")
    elif job.status != Status.CANCELLING:
        move_status(job, Status.CANCELLING)
        add_event(session, job.id, "cancel requested; the worker stops at its next step", stage=job.stage)
    return job


def mark_sent(session: Session, job_id: str, *, only_if_unsent: bool = False) -> str | None:
    """Record that the job's current stage is (about to be) sent; returns that stage, or None for a
    terminal or unknown job (nothing to send). `only_if_unsent` keeps an earlier send time."""
    query = update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
    if only_if_unsent:
        query = query.where(Job.enqueued_at.is_(None))
    return session.execute(
        query.values(enqueued_at=utcnow()).returning(Job.stage).execution_options(synchronize_session=False)
    ).scalar_one_or_none()
