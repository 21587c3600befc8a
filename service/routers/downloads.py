"""/v1/jobs/{id}/model: take a trained model (or a checkpoint) away.

- `GET /v1/jobs/{id}/model` lists the files of the job's model folder with sizes and sha256
  (`?checkpoint=STEP`: of that checkpoint, with the student's configuration and tokenizer).
- `GET /v1/jobs/{id}/model/{name}` sends one file; HTTP Range requests are answered (206) by
  Starlette's `FileResponse`, so an interrupted download resumes.
- `GET /v1/jobs/{id}/model.tar` streams every listed file as one tar (`model/…`, or
  `checkpoint-STEP/…`).

Owner-only like every job route (another key's job is a 404). `tvkd download` uses them.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import models as db
from service.deps import OwnerDep, SessionDep, SettingsDep, in_one_thread
from service.downloads import ServedFile, checkpoint_files, model_files, tar_stream
from service.errors import APIError
from service.routers.jobs import JobId, owned_job
from service.schemas import error_responses
from service.settings import Settings
from service.validation import is_inside, resolve_model

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
STEP_MAX = 2**31 - 1  # checkpoints.step is a 32-bit integer column
BINARY = {"schema": {"type": "string", "format": "binary"}}  # a file's bytes, as OpenAPI declares them

CheckpointQuery = Annotated[
    int | None,
    Query(
        ge=0,
        le=STEP_MAX,
        description="A checkpoint's step (GET /v1/jobs/{id}/checkpoints); default: the model.",
    ),
]


class ModelFile(BaseModel):
    name: str
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Hex digest of the whole file.")
    url: str = Field(description="Where to GET it (HTTP Range supported).")


class ModelFiles(BaseModel):
    object: Literal["model_files"] = "model_files"
    job_id: str
    checkpoint: int | None = Field(description="The checkpoint's step, or null for the final model.")
    folder: str = Field(description="The folder name the archive unpacks to.")
    files: list[ModelFile]
    total_bytes: int
    archive_url: str = Field(description="GET: every file as one uncompressed tar.")


def _served(
    session: Session, settings: Settings, owner: str, job_id: str, step: int | None
) -> list[ServedFile]:
    job = owned_job(session, owner, job_id)
    root = settings.artifacts
    if step is None:
        rel = session.scalar(
            select(db.Artifact.path).where(db.Artifact.job_id == job.id, db.Artifact.kind == "model")
        )
        folder = root / rel if rel else None
        if folder is None or not folder.is_dir() or not is_inside(folder, root):
            raise APIError(
                404, "not_found", f"job {job_id} has no model yet (it is written when training ends)"
            )
        return model_files(folder)
    rel = session.scalar(
        select(db.Checkpoint.path).where(db.Checkpoint.job_id == job.id, db.Checkpoint.step == step)
    )
    folder = root / rel if rel else None
    if folder is None or not (folder / "model.safetensors").is_file() or not is_inside(folder, root):
        raise APIError(404, "not_found", f"job {job_id} has no checkpoint at step {step} (any more)")
    try:
        student: FsPath | None = FsPath(resolve_model(settings, job.student, field="student"))
    except APIError:
        student = None  # the student is gone: the weights and state only
    return checkpoint_files(folder, student)


def _query(step: int | None) -> str:
    return "" if step is None else f"?checkpoint={step}"


@router.get(
    "/{job_id}/model",
    response_model=ModelFiles,
    summary="The files of a job's model (or of one checkpoint), with sizes and sha256",
    responses=error_responses(401, 404, 422),
)
@in_one_thread
def list_model_files(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    checkpoint: CheckpointQuery = None,
) -> ModelFiles:
    files = _served(session, settings, owner, job_id, checkpoint)
    base, query = f"/v1/jobs/{job_id}/model", _query(checkpoint)
    return ModelFiles(
        job_id=job_id,
        checkpoint=checkpoint,
        folder="model" if checkpoint is None else f"checkpoint-{checkpoint}",
        files=[
            ModelFile(name=f.name, size=f.size, sha256=f.sha256, url=f"{base}/{f.name}{query}") for f in files
        ],
        total_bytes=sum(f.size for f in files),
        archive_url=f"{base}.tar{query}",
    )


@router.get(
    "/{job_id}/model/{name}",
    summary="One file of a job's model (HTTP Range supported: a broken download resumes)",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": BINARY}}, **error_responses(401, 404, 422)},
)
@in_one_thread
def get_model_file(
    job_id: JobId,
    name: Annotated[str, Path(max_length=255, description="A file name from the listing.")],
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    checkpoint: CheckpointQuery = None,
) -> FileResponse:
    files = {f.name: f for f in _served(session, settings, owner, job_id, checkpoint)}
    if name not in files:
        raise APIError(404, "not_found", f"job {job_id}'s model has no file {name!r}")
    f = files[name]
    return FileResponse(f.path, filename=f.name, media_type="application/octet-stream")


@router.get(
    "/{job_id}/model.tar",
    summary="Every file of a job's model (or checkpoint) as one uncompressed tar",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": BINARY}}, **error_responses(401, 404, 422)},
)
@in_one_thread
def get_model_archive(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    checkpoint: CheckpointQuery = None,
) -> StreamingResponse:
    files = _served(session, settings, owner, job_id, checkpoint)
    folder = "model" if checkpoint is None else f"checkpoint-{checkpoint}"
    return StreamingResponse(
        tar_stream(files, folder),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-{folder}.tar"'},
    )
