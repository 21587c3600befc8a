"""The core of every job-row write: the status move checked against the state machine (with its
webhook), events, the return to the queue, the lease-conditional update, and the end of a job with
the waiting jobs it settles (`finish` and `settle` call each other: a failed reference fails its
dependents)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import dependencies, webhooks
from service.models import Job, JobEvent, utcnow
from service.statemachine import FIRST_STAGE, STAGES, TERMINAL, Status, can_move

# Job columns a worker may set besides the state (through `record`).
DATA_COLUMNS = frozenset({"precompute_key", "spec", "result"})


class JobStateError(Exception):
    """A transition the rules do not allow (the API answers 409)."""


class StaleMessage(Exception):
    """A message for another stage than the job's (a duplicate or an old one): nothing must run."""


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


def move_status(job: Job, status: str) -> None:
    """The one place a job's status changes: along `TRANSITIONS` only (JobStateError otherwise)."""
    if not can_move(job.status, status):
        raise JobStateError(f"job {job.id} cannot go from {job.status} to {status}")
    previous, job.status = job.status, status
    webhooks.on_status(job, previous)  # its POST is queued in this transaction (an outbox row)


def requeue(job: Job) -> None:
    """The job waits for its (current) stage again: `queued`, no lease, send time now."""
    move_status(job, Status.QUEUED)
    job.lease_token = None
    job.enqueued_at = utcnow()
    job.progress_done, job.progress_total, job.eta_seconds = 0, 0, None


def update_held(session: Session, job_id: str, token: str, **values: Any) -> bool:
    """Set columns of the job while `token` holds its lease; False when the lease was lost."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish(
    session: Session,
    job: Job,
    status: str,
    *,
    message: str,
    error: tuple[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """Move a job to a terminal status (no-op if it already is in one). `succeeded` only from its
    last stage. The waiting jobs that name this one are settled (`settle`): returns the ids of
    those released, for the caller to send after its commit."""
    if job.status in TERMINAL:
        return []
    if status not in TERMINAL:
        raise JobStateError(f"{status} is not a terminal status")
    if status == Status.SUCCEEDED:
        if not STAGES[job.stage].last:
            raise JobStateError(
                f"job {job.id} cannot succeed at stage {job.stage}: {STAGES[job.stage].next} follow"
            )
        job.progress_done = job.progress_total
    move_status(job, status)
    job.finished_at = utcnow()
    job.lease_token = None
    job.eta_seconds = None
    if error:
        job.error_code, job.error_message = error
    add_event(
        session,
        job.id,
        message,
        level="error" if status == Status.FAILED else "info",
        stage=job.stage,
        data=data,
    )
    released: list[str] = []
    for waiting in dependencies.dependents(session, job):
        released += settle(session, waiting)
    return released


def settle(session: Session, job: Job) -> list[str]:
    """A waiting job whose references (service.dependencies) have all succeeded moves to its
    first stage's status, unsent (the caller sends it, else the reconciler does); one whose
    reference failed, was cancelled or is gone fails with code `dependency_failed` (and its own
    dependents with it). Returns the ids of the jobs released; nothing happens while a reference
    is still on its way."""
    if job.status != Status.WAITING:
        return []
    verdict = dependencies.verdict(session, job)
    if verdict is None:
        return []
    action, why = verdict
    if action == "fail":
        code = dependencies.DEPENDENCY_FAILED
        return finish(session, job, Status.FAILED, message=f"failed ({code}): {why}", error=(code, why))
    move_status(job, STAGES[FIRST_STAGE].status)
    job.enqueued_at = None
    named = ", ".join(f"the {f} job {r}" for f, r in dependencies.references(job).items())
    add_event(session, job.id, f"{named} succeeded: the job starts", stage=job.stage)
    return [job.id]


def settle_waiting(session: Session) -> list[str]:
    """`settle` every waiting job (the reconciler's pass); the ids released."""
    released: list[str] = []
    for job in session.scalars(
        select(Job).where(Job.status == Status.WAITING).order_by(Job.created_at).with_for_update()
    ).all():
        released += settle(session, job)
    return released
