"""/v1/jobs/{id}/webhooks: a job's webhook deliveries (oldest first), each with every attempt.

The receiver's URL is shown, its secret never (service/webhooks.py). Owner-only like every job
route."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service import models as db
from service.deps import OwnerDep, SessionDep, in_one_thread
from service.hyperparams import INT_MAX
from service.pagination import DEFAULT_LIMIT, LimitQuery, Page
from service.routers.jobs import JobId, owned_job
from service.schemas import WebhookDeliveryList, WebhookDeliveryView, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def delivery_view(d: db.WebhookDelivery) -> WebhookDeliveryView:
    return WebhookDeliveryView(
        id=d.id,
        event_id=d.event_id,
        event=d.event,
        status=d.status,
        state=d.state,  # type: ignore[arg-type]
        attempts=d.attempts,
        next_attempt_at=d.next_attempt_at if d.state == "pending" else None,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
        log=d.log,  # type: ignore[arg-type]
    )


@router.get(
    "/{job_id}/webhooks",
    response_model=WebhookDeliveryList,
    summary="A job's webhook deliveries and their attempts, oldest first",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_webhook_deliveries(
    job_id: JobId,
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[int | None, Query(ge=0, le=INT_MAX, description="The last delivery id seen.")] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> WebhookDeliveryList:
    job = owned_job(session, owner, job_id)
    hook = session.get(db.JobWebhook, job.id)
    query = select(db.WebhookDelivery).where(db.WebhookDelivery.job_id == job.id)
    if after is not None:
        query = query.where(db.WebhookDelivery.id > after)
    rows = session.scalars(query.order_by(db.WebhookDelivery.id).limit(limit + 1)).all()
    page = Page.of(rows, limit)
    return WebhookDeliveryList(
        url=hook.url if hook else None,
        data=[delivery_view(d) for d in page.rows],
        has_more=page.has_more,
        next_after=page.next_after(lambda d: d.id),
    )
