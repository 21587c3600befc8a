"""/v1/jobs: create (idempotent), list, get and cancel (a job's events, metrics and checkpoints:
service/routers/job_records.py; its samples: samples.py; its generations: generations.py).

A new job is stored waiting for its first stage (`validating`, stage `validate`: see
service/statemachine.py) and sent to the broker; the workers move it on (`queued` →
`precomputing` → …). The row is committed before the message is sent, so a worker never
receives an id it cannot read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import models as db
from service.dependencies import references
from service.deps import ID_RE, OwnerDep, RedactorDep, SessionDep, SettingsDep, checked_id, in_one_thread
from service.errors import APIError, invalid, not_found
from service.jobstate import JobStateError, add_event, mark_sent, new_job, request_cancel
from service.pagination import DEFAULT_LIMIT, LimitQuery, newest_first
from service.schemas import (
    Job,
    JobCreate,
    JobList,
    JobStatus,
    error_responses,
)
from service.settings import Settings
from service.validation import check_job
from service.views import (
    job_response,
    jobs_response,
)
from service.webhooks import MIN_SECRET, WebhookError, check_url, queue_delivery

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(description="A job id (`job_…`).")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Retry-safe creation: the same key with the same body returns the first job "
        "(200); with another body it is a 422 naming this header.",
    ),
]


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the spec with defaults filled, so bodies that differ only
    in key order, spacing or spelled-out defaults count as the same request."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def owned_job(session: Session, owner: str, job_id: str, *, for_update: bool = False) -> db.Job:
    """The caller's job; another key's job is a 404, not a 403 (its existence is not revealed)."""
    checked_id(job_id, "job")
    query = select(db.Job).where(db.Job.id == job_id, db.Job.owner_id == owner)
    if for_update:
        query = query.with_for_update()
    job = session.scalar(query)
    if job is None:
        raise not_found("job", job_id)
    return job


def check_owned(session: Session, owner: str, job_id: str) -> None:
    """Raise a 404 unless the caller owns job `job_id` (owned_job without loading the row)."""
    checked_id(job_id, "job")
    if session.scalar(select(db.Job.id).where(db.Job.id == job_id, db.Job.owner_id == owner)) is None:
        raise not_found("job", job_id)


def _replay(session: Session, owner: str, key: str, digest: str) -> db.Job | None:
    """The job an earlier request with this Idempotency-Key created, if any; 422 if that request
    had another body."""
    job = session.scalar(select(db.Job).where(db.Job.owner_id == owner, db.Job.idempotency_key == key))
    if job is not None and job.spec_hash != digest:
        raise invalid(
            "Idempotency-Key",
            f"Idempotency-Key {key!r} was used for another request body (job {job.id})",
            code="idempotency_key_reused",
        )
    return job


def _webhook(settings: Settings, body: JobCreate) -> tuple[str, str] | None:
    """(url, secret) of the job's webhook: the request's, else the server's default; None without
    one. A URL the server does not allow, or no secret at all, is a 422 naming the field."""
    url = body.webhook.url if body.webhook else settings.webhook_url
    if not url:
        return None
    secret = (body.webhook.secret if body.webhook else None) or settings.webhook_secret
    try:
        check_url(url, settings.webhook_allowed_hosts)
    except WebhookError as exc:
        raise invalid(exc.field if body.webhook else "TVKD_WEBHOOK_URL", str(exc)) from exc
    if len(secret) < MIN_SECRET:
        raise invalid(
            "webhook.secret",
            f"a webhook needs a secret of at least {MIN_SECRET} characters (or the server's "
            "TVKD_WEBHOOK_SECRET) to sign its deliveries",
        )
    return url, secret


def _enqueue(settings: Settings, request: Request, job: db.Job) -> None:
    """Send the new job's first stage to the workers. Its `enqueued_at` was committed with the
    job, so a message lost here is re-sent by the reconciler after TVKD_REQUEUE_AFTER;
    service.queue.publish reports a broker outage as an event itself. Nothing here fails the
    request once the job is stored: any other error is recorded as an event."""
    try:
        from service.queue import publish  # Celery and kombu: imported on the first use

        publish(settings, job.id, job.stage)
    except Exception as exc:
        logger.exception("could not enqueue job %s", job.id)
        with request.app.state.sessions() as session, session.begin():
            mark_sent(session, job.id, only_if_unsent=True)
            add_event(
                session,
                job.id,
                "could not reach the broker; the job will be re-sent",
                level="warning",
                stage=job.stage,
                data={"error": type(exc).__name__},  # the message names the broker's host: the log has it
            )


@router.post(
    "",
    response_model=Job,
    status_code=201,
    summary="Create a distillation job",
    responses={
        200: {"model": Job, "description": "Idempotent replay: the job an earlier request made."},
        **error_responses(401, 422),
    },
)
@in_one_thread
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    settings: SettingsDep,
    session: SessionDep,
    owner: OwnerDep,
    redactor: RedactorDep,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    # An sft job stores only the settings it gives (SFTConfig's own defaults fill the rest).
    hyperparameters = body.hyperparameters.model_dump(exclude_unset=body.kind == "sft")
    given = frozenset(body.model_fields_set | body.hyperparameters.model_fields_set)
    spec = {
        **({"kind": body.kind} if body.kind != "tvkd" else {}),  # tvkd: hashes as before kinds
        "teacher": body.teacher,
        "student": body.student,
        "dataset": body.dataset,
        "alpha": body.alpha,
        "beta": body.beta,
        "hyperparameters": hyperparameters,
        "metadata": body.metadata,
    }
    hook = _webhook(settings, body)
    if body.webhook is not None:  # a request without one keeps the hash it had before webhooks
        spec["webhook"] = body.webhook.model_dump()
    digest = spec_hash(spec)
    if idempotency_key is not None:
        earlier = _replay(session, owner, idempotency_key, digest)
        if earlier is not None:
            response.status_code = 200
            return job_response(session, earlier, redactor, owner)

    valid = check_job(
        settings,
        session,
        request.app.state.model_checks,
        owner,
        teacher=body.teacher,
        student=body.student,
        dataset=body.dataset,
        alpha=body.alpha,
        beta=body.beta,
        hyperparameters=hyperparameters,
        kind=body.kind,
        given=given,
    )
    job = new_job(
        waiting=valid.waiting,
        owner_id=owner,
        teacher=body.teacher or "",  # no teacher (dpo, sft): "" (the API shows null)
        student=body.student,
        dataset=body.dataset,
        spec=valid.settings,
        user_metadata=body.metadata,
        spec_hash=digest,
        idempotency_key=idempotency_key,
    )
    with request.app.state.write_lock:
        session.add(job)
        try:
            session.flush()  # assigns the id for the events; a duplicate Idempotency-Key fails here
            add_event(session, job.id, "job submitted", stage=job.stage)
            if valid.waiting:
                named = ", ".join(f"the {f} job {r}" for f, r in references(job).items())
                add_event(session, job.id, f"waiting for {named} to succeed", stage=job.stage)
            if hook is not None:
                session.add(db.JobWebhook(job_id=job.id, url=hook[0], secret=hook[1]))
                queue_delivery(session, job, None)  # the first status, sent like every later one
            for warning in valid.warnings:
                add_event(
                    session, job.id, warning, level="warning", stage=job.stage, data={"warning": warning}
                )
            session.commit()
        except IntegrityError:
            # Two identical requests raced past the replay check: the unique (owner, key) index
            # let one through; this one answers with that job.
            session.rollback()
            earlier = _replay(session, owner, idempotency_key, digest) if idempotency_key else None
            if earlier is None:
                raise
            response.status_code = 200
            return job_response(session, earlier, redactor, owner)
    if not valid.waiting:  # a waiting job is sent when the jobs it names succeed
        _enqueue(settings, request, job)  # outside the write lock: publishing writes nothing here
    return job_response(session, job, redactor, owner)


@router.get(
    "", response_model=JobList, summary="List jobs, newest first", responses=error_responses(401, 422)
)
@in_one_thread
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    redactor: RedactorDep,
    after: Annotated[
        str | None, Query(max_length=64, description="The last job id of the previous page.")
    ] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
) -> JobList:
    query = select(db.Job).where(db.Job.owner_id == owner)
    if status is not None:
        query = query.where(db.Job.status == status)
    page = newest_first(
        session,
        query,
        db.Job.created_at,
        db.Job.id,
        after=after,
        limit=limit,
        noun="job",
        cursor_where=db.Job.owner_id == owner,
        key_pattern=ID_RE,
    )
    return JobList(
        data=jobs_response(session, page.rows, redactor, owner),
        has_more=page.has_more,
        next_after=page.next_after(lambda j: j.id),
    )


@router.get("/{job_id}", response_model=Job, summary="Get a job", responses=error_responses(401, 404))
@in_one_thread
def get_job(job_id: JobId, session: SessionDep, owner: OwnerDep, redactor: RedactorDep) -> Job:
    return job_response(session, owned_job(session, owner, job_id), redactor, owner)


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    description="A job no worker has started ends `cancelled` at once; a running one goes "
    "`cancelling` and its worker stops at the next step, keeping its last checkpoint.",
    responses=error_responses(401, 404, 409),
)
@in_one_thread
def cancel_job(
    job_id: JobId, request: Request, session: SessionDep, owner: OwnerDep, redactor: RedactorDep
) -> Job:
    with request.app.state.write_lock:
        job = owned_job(session, owner, job_id, for_update=True)
        try:
            request_cancel(session, job)
        except JobStateError as exc:
            session.rollback()
            raise APIError(409, "job_finished", str(exc)) from exc
        session.commit()
    return job_response(session, job, redactor, owner)
