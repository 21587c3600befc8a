"""/v1/precomputes: the teacher value stores (content-addressed, shared between jobs).

A store is not owned by a key, but it names a teacher and describes a dataset, so a key sees
only the stores its own jobs computed or use.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import or_, select

from service import models as db
from service.deps import OwnerDep, RedactorDep, SessionDep, in_one_thread
from service.pagination import DEFAULT_LIMIT, LimitQuery, newest_first
from service.schemas import PrecomputeList, error_responses
from service.views import precompute_view

router = APIRouter(prefix="/v1/precomputes", tags=["precomputes"])


@router.get(
    "",
    response_model=PrecomputeList,
    summary="Value stores your jobs computed or use, newest first",
    responses=error_responses(401, 422),
)
@in_one_thread
def list_precomputes(
    session: SessionDep,
    owner: OwnerDep,
    redactor: RedactorDep,
    after: Annotated[
        str | None,
        Query(max_length=64, pattern=r"^[0-9A-Za-z_-]*$", description="The last key of the previous page."),
    ] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> PrecomputeList:
    mine = select(db.Job.id).where(db.Job.owner_id == owner)
    used = select(db.Job.precompute_key).where(db.Job.owner_id == owner, db.Job.precompute_key.is_not(None))
    query = select(db.Precompute).where(or_(db.Precompute.job_id.in_(mine), db.Precompute.key.in_(used)))
    page = newest_first(
        session,
        query,
        db.Precompute.created_at,
        db.Precompute.key,
        after=after,
        limit=limit,
        noun="precompute",
    )
    # A store may have been computed by another key's job: its id is not shown (only that it exists).
    computed_by = {p.job_id for p in page.rows if p.job_id}
    own = (
        set(session.scalars(select(db.Job.id).where(db.Job.id.in_(computed_by), db.Job.owner_id == owner)))
        if computed_by
        else set()
    )
    scrub = redactor.scrubber(session, owner, [], own=own)
    return PrecomputeList(
        data=[precompute_view(p, scrub, mine=p.job_id in own) for p in page.rows],
        has_more=page.has_more,
        next_after=page.next_after(lambda p: p.key),
    )
