"""The reconciler's writes: a dead worker's lease cleared, a lost message re-sent (each a
compare-and-set, so of several reconcilers one wins), the re-send budget (`retries_exhausted`),
and a cancel nobody is running."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.jobstate.core import add_event, finish
from service.models import Job, JobEvent, utcnow
from service.statemachine import TERMINAL, Status

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
