"""/v1/jobs/{id}/samples: the per-token samples the evaluate stage wrote (samples.json, read with
the library's one reader through service/samples.py), paged by position."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy.orm import Session

from service import samples as samples_file
from service.deps import OwnerDep, SessionDep, SettingsDep, in_one_thread
from service.errors import APIError
from service.hyperparams import INT_MAX
from service.pagination import DEFAULT_LIMIT, LimitQuery, PositionAfter, position_page
from service.routers.jobs import JobId, owned_job
from service.schemas import SampleDetail, SampleList, error_responses
from service.settings import Settings
from tvkd.artifacts import SamplesFile

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _samples_doc(session: Session, settings: Settings, owner: str, job_id: str) -> SamplesFile:
    job = owned_job(session, owner, job_id)
    path = samples_file.samples_path(session, job, settings.artifacts)
    doc = samples_file.load_document(path) if path is not None else None
    if doc is None:
        raise APIError(
            404, "not_found", f"job {job_id} has no samples yet (they are written when it evaluates)"
        )
    return doc


@router.get(
    "/{job_id}/samples",
    response_model=SampleList,
    summary="Summaries of a job's per-token samples",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_samples(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    after: PositionAfter = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> SampleList:
    doc = _samples_doc(session, settings, owner, job_id)
    page = position_page(doc.samples, after, limit, samples_file.summary)
    return SampleList(
        data=page.rows,  # type: ignore[arg-type]
        has_more=page.has_more,
        next_after=page.next_after(lambda s: s["k"]),
        step=doc.step,
    )


@router.get(
    "/{job_id}/samples/{k}",
    response_model=SampleDetail,
    summary="Per-token signals of one sample, chosen and rejected",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def get_sample(
    job_id: JobId,
    k: Annotated[int, Path(ge=0, le=INT_MAX, description="Position in the job's samples.")],
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> SampleDetail:
    doc = _samples_doc(session, settings, owner, job_id)
    if k >= len(doc.samples):
        raise APIError(404, "not_found", f"job {job_id} has {len(doc.samples)} samples; no sample {k}")
    return SampleDetail.model_validate(samples_file.detail(doc, k))
