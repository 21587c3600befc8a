"""/v1/jobs/{id}/events, /metrics, /metrics/series and /checkpoints: what a job recorded while it
ran (rows the workers wrote through service/jobstate.py and worker/reporting.py), paged oldest
first by id."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from service import models as db
from service.deps import OwnerDep, RedactorDep, SessionDep, in_one_thread
from service.hyperparams import INT_MAX
from service.pagination import DEFAULT_LIMIT, LimitQuery, oldest_first
from service.routers.jobs import JobId, check_owned
from service.schemas import (
    CheckpointList,
    EventList,
    MetricList,
    MetricSeries,
    MetricSeriesList,
    error_responses,
)
from service.views import checkpoint_view, events_response, metric_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MetricText = Annotated[str | None, Query(max_length=100, pattern=r"^[^\x00]*$")]


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    summary="A job's events, oldest first",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_events(
    job_id: JobId,
    session: SessionDep,
    owner: OwnerDep,
    redactor: RedactorDep,
    after: Annotated[int | None, Query(ge=0, le=INT_MAX, description="The last event id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size (1..1000).")] = 100,
) -> EventList:
    check_owned(session, owner, job_id)
    query = select(db.JobEvent).where(db.JobEvent.job_id == job_id)
    page = oldest_first(session, query, db.JobEvent.id, after=after, limit=limit)
    return EventList(
        data=events_response(session, list(page.rows), redactor, owner, job_id),
        has_more=page.has_more,
        next_after=page.next_after(lambda e: e.id),
    )


def _metric_query(job_id: str, split: str | None, name: str | None, after_step: int | None) -> Any:
    query = select(db.MetricPoint).where(db.MetricPoint.job_id == job_id)
    if split is not None:
        query = query.where(db.MetricPoint.split == split)
    if name is not None:
        query = query.where(db.MetricPoint.name == name)
    if after_step is not None:
        query = query.where(db.MetricPoint.step > after_step)
    return query


# Steps are a 32-bit INTEGER column: a bound the database cannot compare against is a 422, not a 500.
STEP_MAX = 2**31 - 1
AfterStep = Annotated[int | None, Query(ge=-1, le=STEP_MAX, description="Only steps after this one.")]


@router.get(
    "/{job_id}/metrics",
    response_model=MetricList,
    summary="A job's metric points, in the order they were logged",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_metrics(
    job_id: JobId,
    session: SessionDep,
    owner: OwnerDep,
    split: Annotated[MetricText, Query(description="train, eval or teacher (teacher check).")] = None,
    name: Annotated[MetricText, Query(description="Metric name, e.g. loss.")] = None,
    after_step: AfterStep = None,
    after: Annotated[int | None, Query(ge=0, le=INT_MAX, description="The last point id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=5000, description="Page size (1..5000).")] = 1000,
) -> MetricList:
    check_owned(session, owner, job_id)
    query = _metric_query(job_id, split, name, after_step)
    page = oldest_first(session, query, db.MetricPoint.id, after=after, limit=limit)
    return MetricList(
        data=[metric_view(m) for m in page.rows],
        has_more=page.has_more,
        next_after=page.next_after(lambda m: m.id),
    )


@router.get(
    "/{job_id}/metrics/series",
    response_model=MetricSeriesList,
    summary="A job's metrics as one compact series per (split, name), by step",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def metric_series(
    job_id: JobId,
    session: SessionDep,
    owner: OwnerDep,
    split: Annotated[MetricText, Query(description="train, eval or teacher (teacher check).")] = None,
    name: Annotated[MetricText, Query(description="Metric name, e.g. loss.")] = None,
    after_step: AfterStep = None,
) -> MetricSeriesList:
    check_owned(session, owner, job_id)
    query = _metric_query(job_id, split, name, after_step).order_by(
        db.MetricPoint.split, db.MetricPoint.name, db.MetricPoint.step
    )
    series: dict[tuple[str, str], MetricSeries] = {}
    for m in session.scalars(query):
        s = series.setdefault(
            (m.split, m.name), MetricSeries(split=m.split, name=m.name, steps=[], values=[])
        )
        s.steps.append(m.step)
        s.values.append(metric_view(m).value)
    return MetricSeriesList(data=list(series.values()))


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="A job's checkpoints, oldest first",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_checkpoints(
    job_id: JobId,
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[int | None, Query(ge=0, le=INT_MAX, description="The last checkpoint id seen.")] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> CheckpointList:
    check_owned(session, owner, job_id)
    query = select(db.Checkpoint).where(db.Checkpoint.job_id == job_id)
    page = oldest_first(session, query, db.Checkpoint.id, after=after, limit=limit)
    return CheckpointList(
        data=[checkpoint_view(c) for c in page.rows],
        has_more=page.has_more,
        next_after=page.next_after(lambda c: c.id),
    )
