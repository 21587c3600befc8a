"""Database rows → API response bodies (service.schemas). The one place that decides what a job
looks like from outside, so the list, get, create and cancel routes all show the same object."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import dependencies
from service import models as db
from service import schemas as api
from service.disclosure import Redactor, Scrub
from tvkd.config import ConfigError, MethodConfig, flat_settings


def finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def job_warnings(job: db.Job) -> list[str]:
    """MethodConfig.warnings() of the job's settings. Recomputed rather than stored: they are a
    pure function of the spec, so they need no column and can never disagree with it."""
    try:
        method = MethodConfig(**job.spec["train"]["method"])
    except (ConfigError, TypeError, KeyError):
        return []
    return method.warnings()


# Metrics that a run may not log (MATH.md "Metrics"): null in the API's final metrics then.
NULLABLE_METRICS = ("tvkd/shaping_accuracy",)


def with_null_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with each NULLABLE_METRICS name set to None in every non-empty metrics dict
    (`metrics`, `eval_metrics`, at the top level and under `train`) that lacks it."""

    def fill(part: Any) -> Any:
        if not isinstance(part, dict):
            return part
        out = dict(part)
        for key in ("metrics", "eval_metrics"):
            if isinstance(out.get(key), dict) and out[key]:
                out[key] = {**dict.fromkeys(NULLABLE_METRICS), **out[key]}
        return out

    out = fill(result)
    if isinstance(out.get("train"), dict):
        out["train"] = fill(out["train"])
    return out


def job_view(job: db.Job, scrub: Scrub, *, model_path: str | None = None) -> api.Job:
    """The job as its owner sees it; worker-written text (error, result) goes through `scrub`
    (service.disclosure: no server paths, tracebacks, SQL or other keys' job ids)."""
    total = job.progress_total or 0
    done = job.progress_done or 0
    settings = flat_settings(job.spec)  # alpha and beta are top-level in the API, the rest is flat
    error = (
        api.JobErrorInfo(code=job.error_code, message=scrub.text(job.error_message or ""))
        if job.error_code
        else None
    )
    return api.Job(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        stage=job.stage,
        progress=api.Progress(
            done=done,
            total=total,
            fraction=min(1.0, done / total) if total > 0 else None,
            eta_seconds=finite(job.eta_seconds),
        ),
        kind=(job.spec or {}).get("kind") or "tvkd",
        teacher=job.teacher or None,  # "" = no teacher (dpo, sft)
        student=job.student,
        dataset=job.dataset,
        depends_on=dependencies.references(job),
        alpha=settings.pop("alpha", None),
        beta=settings.pop("beta", None),
        hyperparameters=scrub(settings),
        metadata=job.user_metadata or {},
        warnings=job_warnings(job),
        error=error,
        # `result` accumulates stage reports while the job runs; it is shown once it is final.
        result=scrub(with_null_metrics(job.result)) if job.status == "succeeded" and job.result else None,
        model_path=model_path,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def model_path_of(session: Session, job: db.Job) -> str | None:
    """The model folder artifact of a succeeded job (one indexed query, only for those)."""
    if job.status != "succeeded":
        return None
    return session.scalar(
        select(db.Artifact.path).where(db.Artifact.job_id == job.id, db.Artifact.kind == "model")
    )


def _shown(job: db.Job) -> list[Any]:
    """The worker-written parts of a job that its view shows."""
    return [job.error_message, job.result if job.status == "succeeded" else None]


def job_response(session: Session, job: db.Job, redactor: Redactor, owner: str) -> api.Job:
    scrub = redactor.scrubber(session, owner, _shown(job), own=[job.id])
    return job_view(job, scrub, model_path=model_path_of(session, job))


def jobs_response(session: Session, jobs: list[db.Job], redactor: Redactor, owner: str) -> list[api.Job]:
    scrub = redactor.scrubber(session, owner, [x for j in jobs for x in _shown(j)], own=[j.id for j in jobs])
    succeeded = [j.id for j in jobs if j.status == "succeeded"]
    paths: dict[str, str] = {}
    if succeeded:
        rows = session.execute(
            select(db.Artifact.job_id, db.Artifact.path).where(
                db.Artifact.job_id.in_(succeeded), db.Artifact.kind == "model"
            )
        )
        paths = {job_id: path for job_id, path in rows}
    return [job_view(j, scrub, model_path=paths.get(j.id)) for j in jobs]


def event_view(e: db.JobEvent, scrub: Scrub) -> api.Event:
    return api.Event(
        id=e.id,
        created_at=e.created_at,
        level=e.level,
        stage=e.stage,
        message=scrub.text(e.message),
        data=scrub(e.data or {}),
    )


def events_response(
    session: Session, events: list[db.JobEvent], redactor: Redactor, owner: str, job_id: str
) -> list[api.Event]:
    scrub = redactor.scrubber(session, owner, [x for e in events for x in (e.message, e.data)], own=[job_id])
    return [event_view(e, scrub) for e in events]


def metric_view(m: db.MetricPoint) -> api.MetricPoint:
    return api.MetricPoint(
        id=m.id, step=m.step, split=m.split, name=m.name, value=finite(m.value), created_at=m.created_at
    )


def checkpoint_view(c: db.Checkpoint) -> api.Checkpoint:
    return api.Checkpoint(id=c.id, step=c.step, path=c.path, created_at=c.created_at)


def dataset_view(d: db.Dataset) -> api.Dataset:
    return api.Dataset(
        id=d.id,
        filename=d.filename,
        bytes=d.bytes,
        sha256=d.sha256,
        rows=d.rows,
        pairs=d.pairs,
        created_at=d.created_at,
    )


def precompute_view(p: db.Precompute, scrub: Scrub, *, mine: bool) -> api.Precompute:
    """A value store; `job_id` (the job that computed it) only when that job is the caller's."""
    fields: dict[str, Any] = p.fields or {}
    return api.Precompute(
        key=p.key,
        status=p.status,
        teacher=p.teacher,
        path=p.path,
        pairs=p.pairs,
        tokens=p.tokens,
        bytes=p.bytes,
        fields=scrub(fields),
        job_id=p.job_id if mine else None,
        created_at=p.created_at,
        completed_at=p.completed_at,
    )
