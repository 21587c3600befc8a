"""The body of every stage task: take the job's lease, run the stage, record how it ended.

    claim ─► heartbeat thread + JobReporter ─► worker.stages runner ─► complete / fail

- claim (one transaction, service.jobstate.start_stage): take the lease; nothing is done (the
  message is acknowledged and logged) when the job is unknown, terminal, held by a live worker,
  or in another stage than this task runs (a stale or duplicate message: the reconciler may send
  a job twice, Redis may redeliver). A job whose cancel was requested ends `cancelled` here.
- While the stage runs, a heartbeat thread refreshes the lease every TVKD_HEARTBEAT_SECONDS and
  reads `cancel_requested`; a chat template rendering when a stop is requested (cancel, shutdown,
  lost lease) is interrupted then (tvkd.sandbox.stop_when), and the stage ends as stopped. A
  lost lease (another worker took the job over after this one went silent) makes the stage
  raise `LeaseLost` at its next step; nothing more is written.
- complete: advance job.stage, show `queued` and send the next stage's message (after the commit,
  so a fast worker never sees the old stage); or finish `succeeded`; or, when stopped, finish
  `cancelled` (training keeps the checkpoint it saved on stopping) or — the worker is shutting
  down — hand the job back to its queue, to be resumed by another worker.
- fail: an exception of the job's own (its data, models, settings, memory, a bug) ends the job
  `failed` with {code, message}, an event with the traceback's tail, and for bad data an event
  naming the rows. A database that is unreachable or dropped the connection is not the job's
  error: every write here is retried (service.db.in_transaction), and a transient database error
  that outlasts the retries hands the job back to its queue (or, when even that cannot be
  written, leaves its lease to expire, and the reconciler re-sends it); the stage resumes.
  A database error never puts SQL in the job's message.

Every change of the job row goes through service.jobstate and checks the lease token, so a
worker that lost its lease cannot write a final status over the new holder's work.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import jobstate
from service.db import cached_sessions, in_transaction, is_transient
from service.jobstate import StaleMessage, add_event, finish
from service.models import Job
from service.queue import PUBLISH_ERRORS, send_stage
from service.settings import Settings
from service.statemachine import FIRST_STAGE, Status, next_stage
from tvkd.data import DataError
from tvkd.numerics import NonFiniteError, nonfinite_paths
from tvkd.sandbox import TemplateStopped, stop_when
from worker.context import Outcome, StageContext, job_output_rel
from worker.errors import RankCrashed, RankFailed, classify
from worker.reporting import SHUTDOWN, Heartbeat, JobReporter, LeaseLost, StopFlags
from worker.stages import RUNNERS

log = logging.getLogger("tvkd.worker")
TRACEBACK_LINES = 25


def install_shutdown_hook() -> None:
    """On warm shutdown (SIGTERM/SIGINT) running stages stop at their next step and hand their
    job back to the queue instead of holding the worker until the stage ends."""

    def _on_shutdown(**_: Any) -> None:
        SHUTDOWN.set()

    worker_shutting_down.connect(_on_shutdown, weak=False)


def run_task(app: Celery, stage: str, job_id: str, *, worker: str) -> str:
    """Run `stage` of `job_id` (the stage the message was sent for). Returns what happened (for
    the log)."""
    settings: Settings = app.tvkd_settings  # type: ignore[attr-defined]
    factory = cached_sessions(settings.resolved_database_url)
    claimed = claim(factory, settings, job_id, stage, worker)
    if claimed is None:
        return "skipped"
    job, token = claimed
    flags = StopFlags()
    reporter = JobReporter(factory, job.id, token, job.stage, flags, artifact_root=settings.artifacts)
    beat = Heartbeat(factory, job.id, token, flags, interval=settings.heartbeat_seconds)
    ctx = StageContext(app, settings, factory, job, token, worker, reporter, flags)
    beat.start()
    try:
        # A chat template that loops is interrupted by a cancel or a shutdown (within the
        # heartbeat's second), not only by its time limit (TVKD_TEMPLATE_SECONDS).
        with stop_when(lambda: flags.requested or flags.lease_lost):
            outcome = RUNNERS[job.stage](ctx)
    except TemplateStopped:
        if flags.lease_lost:
            log.warning("job %s: lease lost during %s; stopped without writing", job.id, job.stage)
            return "lease_lost"
        outcome = Outcome("stopped", message=f"stopped during {job.stage}, while a chat template ran")
    except LeaseLost:
        log.warning("job %s: lease lost during %s; stopped without writing", job.id, job.stage)
        return "lease_lost"
    except Exception as exc:
        if flags.lease_lost:
            log.warning("job %s: %s failed after the lease was lost: %s", job.id, job.stage, exc)
            return "lease_lost"
        beat.stop()
        reporter.close()
        if is_transient(exc):
            log.warning("job %s: %s stopped: the database stayed unavailable (%s)", job.id, job.stage, exc)
            return give_back(ctx, exc)
        if isinstance(exc, RankCrashed):
            log.warning("job %s: a rank of %s crashed: %s", job.id, job.stage, exc)
            return retry_crashed(ctx, exc)
        log.exception("job %s: %s failed", job.id, job.stage)
        fail(ctx, exc)
        return "failed"
    finally:
        beat.stop()
        reporter.close()
    return complete(ctx, outcome)


def claim(
    factory: sessionmaker[Session], settings: Settings, job_id: str, stage: str, worker: str
) -> tuple[Job, str] | None:
    """Take the job's lease for `stage`; None (and nothing written but a cancel) when this
    message must not run."""
    try:
        taken = in_transaction(
            factory,
            lambda session: jobstate.start_stage(
                session,
                job_id,
                stage,
                worker,
                timeout=settings.heartbeat_timeout,
                output_dir=job_output_rel(job_id),
            ),
            what=f"job {job_id}: claim {stage}",
        )
    except StaleMessage as stale:
        log.info("job %s: message for %s but %s; ignored", job_id, stage, stale)
        return None
    if taken.job is None or taken.token is None:
        log.info("job %s (%s): not taken: %s", job_id, stage, taken.reason)
        return None
    return taken.job, taken.token


def mark_sent(factory: sessionmaker[Session], job_id: str) -> None:
    in_transaction(
        factory, lambda session: jobstate.mark_sent(session, job_id), what=f"job {job_id}: mark sent"
    )


def _send(ctx: StageContext, stage: str, job_id: str | None = None) -> None:
    job_id = job_id or ctx.job.id
    try:
        send_stage(ctx.app, job_id, stage)
    except PUBLISH_ERRORS as exc:
        log.warning("job %s: could not send %s (%s); the reconciler will", job_id, stage, exc)
        kind = type(exc).__name__
        in_transaction(
            ctx.factory,
            lambda session: add_event(
                session,
                job_id,
                f"the broker is unavailable ({kind}); {stage} will be sent when it is back",
                level="warning",
                stage=stage,
            ),
            what=f"job {job_id}: broker event",
        )


def complete(ctx: StageContext, outcome: Outcome) -> str:
    """Record how the stage ended: the job succeeds (last stage), is cancelled, goes back to its
    queue (the worker is shutting down) or on to the next stage, whose message is sent after the
    commit (so a fast worker never sees the old stage). A job that succeeds releases the waiting
    jobs that named its model (service.dependencies); their first stage is sent here too. A result
    that is not finite (NaN/Inf, which JSON and PostgreSQL's JSON columns refuse) fails the job
    once, with code nonfinite_result, instead of failing the write and having the stage run again.
    The transaction is retried on a transient database error; one that committed before its answer
    was lost finds the lease gone on the retry and reports "lease_lost" (the reconciler then
    re-sends the next stage)."""
    bad = [*nonfinite_paths(outcome.result, "result"), *nonfinite_paths(outcome.data, "data")]
    if bad:
        what = ", ".join(bad[:5])
        fail(ctx, NonFiniteError("nonfinite_result", f"the {ctx.stage} stage's {what} is NaN/Inf"))
        return "failed"
    released: list[str] = []

    def record(session: Session) -> str:
        nonlocal released
        result, released = _record_outcome(session, ctx, outcome)
        return result

    result = in_transaction(ctx.factory, record, what=f"job {ctx.job.id}: record {ctx.stage}")
    if result == "succeeded":
        for waiting in released:  # jobs that named this one's model and need nothing else now
            mark_sent(ctx.factory, waiting)
            _send(ctx, FIRST_STAGE, waiting)
        return "succeeded"
    if result.startswith("send "):
        send = result.removeprefix("send ")
        _send(ctx, send)
        return "handed_back" if outcome.kind == "stopped" else f"advanced to {send}"
    return result


def _record_outcome(session: Session, ctx: StageContext, outcome: Outcome) -> tuple[str, list[str]]:
    """complete()'s transaction: what happened ("send <stage>" when a message must follow), and
    the jobs a success released."""
    job = jobstate.held(session, ctx.job.id, ctx.token)
    if job is None:
        log.warning("job %s: lease lost before %s could be recorded", ctx.job.id, ctx.stage)
        return "lease_lost", []
    jobstate.record(session, job.id, ctx.token, result={**(job.result or {}), **outcome.result})
    if outcome.job_values:
        jobstate.record(session, job.id, ctx.token, **outcome.job_values)
    session.refresh(job)
    if outcome.kind == "succeeded":
        released = finish(session, job, Status.SUCCEEDED, message=outcome.message, data=outcome.data)
        return "succeeded", list(released or [])
    if ctx.flags.cancel or job.cancel_requested:
        where = f"; checkpoint {outcome.data['checkpoint']} kept" if outcome.data.get("checkpoint") else ""
        what = outcome.message or f"{ctx.stage} done"
        finish(session, job, Status.CANCELLED, message=f"cancelled ({what}{where})", data=outcome.data)
        return "cancelled", []
    if outcome.kind == "stopped":  # the worker is shutting down: let another one resume it
        jobstate.hand_back(
            session,
            job,
            message=f"worker {ctx.worker} is shutting down: {outcome.message or 'stopped'}; "
            "the job goes back to the queue and resumes from where it stopped",
            data=outcome.data,
        )
    else:
        kind = (job.spec or {}).get("kind") or "tvkd"
        to = outcome.next_stage or next_stage(kind, job.stage)
        assert to is not None, f"{job.stage} is the last stage of a {kind} job: it must succeed"
        jobstate.advance(session, job, to, message=outcome.message, data=outcome.data)
    return f"send {job.stage}", []


def give_back(ctx: StageContext, exc: BaseException) -> str:
    """The database stayed away longer than the retries: not the job's error. Hand the job back to
    its queue to resume; if even that cannot be written, leave the lease to expire (the
    reconciler re-sends the job when the database is back)."""

    def hand_back(session: Session) -> bool:
        job = jobstate.held(session, ctx.job.id, ctx.token)
        if job is None:
            return False
        jobstate.hand_back(
            session,
            job,
            message=f"the database was unavailable during {ctx.stage} ({type(exc).__name__}); the job goes "
            "back to the queue and resumes from where it stopped",
        )
        return True

    try:
        handed = in_transaction(ctx.factory, hand_back, what=f"job {ctx.job.id}: hand back")
    except SQLAlchemyError as again:
        log.warning("job %s: could not hand back (%s); the reconciler will re-send it", ctx.job.id, again)
        return "db_unavailable"
    if handed:
        _send(ctx, ctx.stage)
    return "handed_back" if handed else "lease_lost"


def retry_crashed(ctx: StageContext, exc: RankCrashed) -> str:
    """A rank of a torchrun stage died (worker/torchrun.py): the attempt failed, not the job. Hand
    the job back to its queue to resume from its last checkpoint, counted as a re-send; past
    TVKD_MAX_RESENDS the job fails with `retries_exhausted`."""

    def write(session: Session) -> str:
        job = jobstate.held(session, ctx.job.id, ctx.token)
        if job is None:
            return "lease_lost"
        limit = ctx.settings.max_resends
        if job.resends >= limit:
            message = (
                f"the {job.stage} stage was re-sent {job.resends} times (TVKD_MAX_RESENDS={limit}) and a "
                f"rank crashed again: {exc}"
            )
            code = jobstate.RETRIES_EXHAUSTED
            finish(session, job, Status.FAILED, message=f"failed ({code}): {message}", error=(code, message))
            return "failed"
        jobstate.hand_back(
            session,
            job,
            message=f"a rank crashed ({exc}); the job goes back to the queue and resumes from its last "
            "checkpoint",
            data={"crashed": str(exc)},
        )
        job.resends += 1
        return "handed_back"

    result = in_transaction(ctx.factory, write, what=f"job {ctx.job.id}: retry after a rank crash")
    if result == "handed_back":
        _send(ctx, ctx.stage)
    return result


def _traceback_tail(exc: BaseException) -> list[str]:
    if isinstance(exc, RankFailed) and exc.traceback:  # the rank's, not the relay's
        return exc.traceback[-TRACEBACK_LINES:]
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    return lines[-TRACEBACK_LINES:]


def fail(ctx: StageContext, exc: BaseException) -> None:
    code = classify(exc, ctx.stage)
    message = (str(exc) or type(exc).__name__)[:2000]
    if isinstance(exc, SQLAlchemyError):  # its text holds SQL and parameters: the log has them
        message = f"a database error ({type(exc).__name__}; details in the worker log)"
    in_transaction(ctx.factory, lambda session: _record_failure(session, ctx, exc, code, message),
                   what=f"job {ctx.job.id}: record the failure")  # fmt: skip


def _record_failure(session: Session, ctx: StageContext, exc: BaseException, code: str, message: str) -> None:
    job = jobstate.held(session, ctx.job.id, ctx.token)
    if job is None:
        return
    if isinstance(exc, DataError):
        issues = exc.report.issues
        rows = sorted({i.row for i in issues if i.row >= 0})
        add_event(
            session,
            job.id,
            exc.report.summary(max_issues=10),
            level="error",
            stage=job.stage,
            data={
                "rows": rows[:200],
                "issues": [
                    {"row": i.row, "field": i.field, "code": i.code, "message": i.message}
                    for i in issues[:200]
                ],
            },
        )
    add_event(
        session,
        job.id,
        f"{job.stage} failed: {type(exc).__name__}: {message}",
        level="error",
        stage=job.stage,
        data={"code": code, "traceback": _traceback_tail(exc)},
    )
    finish(session, job, Status.FAILED, message=f"failed ({code}): {message}", error=(code, message))
