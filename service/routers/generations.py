"""/v1/jobs/{id}/generations: the evaluate stage's greedy answers to held-out prompts, before and
after training, with their scores (generations.json, read with the library's one reader,
`tvkd.answers.read_generations`); the dashboard's job page shows them side by side."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import models as db
from service.deps import OwnerDep, SessionDep, SettingsDep, in_one_thread
from service.errors import APIError
from service.pagination import DEFAULT_LIMIT, LimitQuery, PositionAfter, position_page
from service.routers.jobs import JobId, owned_job
from service.schemas import GenerationList, error_responses
from service.validation import is_inside
from tvkd.answers import GENERATIONS_FILE, GenerationsFile, read_generations
from tvkd.artifacts import ArtifactError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def generations_path(session: Session, job: db.Job, artifacts: Path) -> Path | None:
    """The job's generations.json inside the artifact root, or None when there is none (yet)."""
    rel = session.scalar(
        select(db.Artifact.path).where(db.Artifact.job_id == job.id, db.Artifact.kind == "generations")
    )
    candidates = [artifacts / rel] if rel else []
    if job.output_dir:
        candidates.append(artifacts / job.output_dir / GENERATIONS_FILE)
    return next((p for p in candidates if p.is_file() and is_inside(p, artifacts)), None)


def _document(session: Session, artifacts: Path, owner: str, job_id: str) -> GenerationsFile:
    path = generations_path(session, owned_job(session, owner, job_id), artifacts)
    try:
        if path is not None:
            return read_generations(path)
    except (OSError, ArtifactError):
        pass  # caught mid-write, or written by a newer tvkd: not there yet
    raise APIError(
        404,
        "not_found",
        f"job {job_id} has no generations (the evaluate stage writes them when the job sets gen_prompts)",
    )


@router.get(
    "/{job_id}/generations",
    response_model=GenerationList,
    summary="Greedy answers to held-out prompts before and after training, with their scores",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_generations(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    after: PositionAfter = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> GenerationList:
    doc = _document(session, settings.artifacts, owner, job_id)
    page = position_page(doc.generations, after, limit, lambda k, g: {"k": k, **asdict(g)})
    return GenerationList.model_validate(
        {
            "data": page.rows,
            "has_more": page.has_more,
            "next_after": page.next_after(lambda g: g["k"]),
            "step": doc.step,
            "max_new_tokens": doc.max_new_tokens,
            "scorers": doc.scorers,
            "before": doc.before,
            "after": doc.after,
        }
    )
