"""Every write of a job's status, stage, lease, progress or send time goes through here (the API,
the workers and the reconciler alike), checked against the state machine that
service/statemachine.py declares:

- a status moves only along `TRANSITIONS`, a stage only to one of its `next` stages; terminal
  states (succeeded, failed, cancelled) are final: `JobStateError` otherwise;
- a job is run by at most one worker at a time: a worker takes a *lease* (a random token written
  with a conditional UPDATE) and keeps it alive with heartbeats; a lease whose heartbeat is older
  than the timeout may be taken over (the reconciler re-sends such jobs). Writes by a worker are
  conditional on its token, so one that lost its lease cannot overwrite the new holder's state;
- every change a user should see is recorded as an event.

The functions take an open session and leave the commit to the caller's transaction.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service import dependencies, webhooks
from service.models import Job, JobEvent, utcnow
from service.statemachine import FIRST_STAGE, NOT_STARTED, STAGES, TERMINAL, Status, can_move

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


def _move(job: Job, status: str) -> None:
    if not can_move(job.status, status):
        raise JobStateError(f"job {job.id} cannot go from {job.status} to {status}")
    previous, job.status = job.status, status
    webhooks.on_status(job, previous)  # its POST is queued in this transaction (an outbox row)


# -------------------------------------------------------------------------------------------- API


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
        _move(job, Status.CANCELLING)
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


# -------------------------------------------------------------------------------------------- workers


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
        _move(job, STAGES[job.stage].status)
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
    return _update_held(session, job_id, token, **values)


def set_progress(session: Session, job_id: str, token: str, done: int, total: int, eta: float | None) -> bool:
    """The running stage's progress (units done of total, seconds left)."""
    return _update_held(session, job_id, token, progress_done=done, progress_total=total, eta_seconds=eta)


def _update_held(session: Session, job_id: str, token: str, **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def advance(session: Session, job: Job, to: str, *, message: str, data: dict[str, Any] | None = None) -> None:
    """The job's stage is done: move it to stage `to` (one of the stage's `next`), show `queued`,
    release the lease and record the send time; the caller sends the message after the commit."""
    if to not in STAGES[job.stage].next:
        raise JobStateError(f"stage {job.stage} cannot be followed by {to!r} (only {STAGES[job.stage].next})")
    add_event(session, job.id, message, stage=job.stage, data=data)
    job.stage = to
    job.resends = 0
    _wait(job)
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
    _wait(job)


def _wait(job: Job) -> None:
    _move(job, Status.QUEUED)
    job.lease_token = None
    job.enqueued_at = utcnow()
    job.progress_done, job.progress_total, job.eta_seconds = 0, 0, None


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
    _move(job, status)
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


# -------------------------------------------------------------------------------------------- chains


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
    _move(job, STAGES[FIRST_STAGE].status)
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


# -------------------------------------------------------------------------------------------- leases


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
    return _update_held(session, job_id, token, heartbeat_at=utcnow())


# -------------------------------------------------------------------------------------------- reconciler


RETRIES_EXHAUSTED = "retries_exhausted"


def reclaim_dead(
    session: Session,
    job_id: str,
    token: str,
    beat: datetime | None,
    worker: str | None,
    *,
    max_resends: int | None = None,
) -> str | None:
    """Clear the lease of a worker whose heartbeat stopped (compare-and-set on the token and beat
    it saw, so of several reconcilers only one wins). Returns "resend" (the caller re-sends the
    stage, then `count_resend`), "exhausted" (the stage was re-sent `max_resends` times already:
    the job failed with `retries_exhausted`), or None (somebody else moved the job)."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token, Job.heartbeat_at == beat)
        .values(lease_token=None, enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        return None
    if _exhausted(session, job_id, max_resends, f"its worker {worker} stopped beating"):
        return "exhausted"
    add_event(
        session,
        job_id,
        f"worker {worker} stopped beating (last heartbeat {beat:%H:%M:%S} UTC): job re-enqueued; "
        "it resumes from its last checkpoint",
        level="warning",
        data={"previous_worker": worker, "last_heartbeat": beat.isoformat() if beat else None},
    )
    return "resend"


def resend(
    session: Session, job_id: str, sent: datetime | None, *, max_resends: int | None = None
) -> str | None:
    """Record the re-send of a job nobody picked up since `sent` (compare-and-set on it). Returns
    "resend", "exhausted" or None, as `reclaim_dead`."""
    cond = Job.enqueued_at.is_(None) if sent is None else Job.enqueued_at == sent
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token.is_(None), cond, Job.status.not_in(TERMINAL))
        .values(enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        return None
    what = "was never sent" if sent is None else f"has not been picked up since {sent:%H:%M:%S} UTC"
    if _exhausted(session, job_id, max_resends, f"it {what}"):
        return "exhausted"
    add_event(
        session, job_id, f"the job {what} and no message for it is in the queue: re-sent", level="warning"
    )
    return "resend"


def count_resend(session: Session, job_id: str) -> None:
    """One more re-send of the job's current stage went out (after the publish succeeded)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(TERMINAL))
        .values(resends=Job.resends + 1)
        .execution_options(synchronize_session=False)
    )


def attempts_of_stage(session: Session, job_id: str, stage: str) -> list[dict[str, Any]]:
    """Every start of `stage` for the job (its "… running on …" events): worker, attempt, time."""
    rows = session.scalars(
        select(JobEvent)
        .where(
            JobEvent.job_id == job_id, JobEvent.stage == stage, JobEvent.message.like(f"{stage} running on %")
        )
        .order_by(JobEvent.id)
    )
    return [
        {"worker": e.data.get("worker"), "attempt": e.data.get("attempt"), "at": e.created_at.isoformat()}
        for e in rows
    ]


def _exhausted(session: Session, job_id: str, max_resends: int | None, why: str) -> bool:
    """Fail the job `retries_exhausted` when its stage was re-sent `max_resends` times already."""
    if max_resends is None:
        return False
    job = session.get(Job, job_id, populate_existing=True, with_for_update=True)
    if job is None or job.status in TERMINAL or job.resends < max_resends:
        return False
    attempts = attempts_of_stage(session, job_id, job.stage)
    message = (
        f"the {job.stage} stage was re-sent {job.resends} times (TVKD_MAX_RESENDS={max_resends}) and "
        f"{why} again; it ran {len(attempts)} times"
    )
    finish(
        session,
        job,
        Status.FAILED,
        message=f"failed ({RETRIES_EXHAUSTED}): {message}",
        error=(RETRIES_EXHAUSTED, message),
        data={"code": RETRIES_EXHAUSTED, "stage": job.stage, "resends": job.resends, "attempts": attempts},
    )
    return True


def cancel_unattended(session: Session, job_id: str, token: str | None, beat: datetime | None) -> bool:
    """End a job whose cancel was requested while no worker runs it (compare-and-set)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.status in TERMINAL or job.lease_token != token or job.heartbeat_at != beat:
        return False  # somebody else moved it meanwhile
    finish(session, job, Status.CANCELLED, message="cancelled (no worker was running it)")
    return True
