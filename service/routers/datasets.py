"""/v1/datasets: upload a preference dataset (checked before it is accepted) and list yours.

An upload is streamed into a private folder under the artifact root, every row is checked with
tvkd.data.load_pairs (on_error="raise"), and only a clean file is moved, by one rename, to
`datasets/<id>/<file>` and recorded. A bad file is a 422 naming its first bad row and field, with
every issue in `details`; nothing of it is kept.
"""

from __future__ import annotations

import os
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import models as db
from service.deps import ID_RE, OwnerDep, SessionDep, SettingsDep, checked_id, in_one_thread
from service.errors import APIError, invalid, not_found
from service.pagination import DEFAULT_LIMIT, LimitQuery, newest_first
from service.schemas import Dataset, DatasetList, error_responses
from service.settings import Settings
from service.uploads import ReceivedFile, incoming_dir, receive_file
from service.validation import DATA_SUFFIXES
from service.views import dataset_view
from tvkd.data import FILE_ROW, DataError, DataReport, load_pairs
from tvkd.sources import ReadLimits

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

MAX_DETAILS = 1000

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A preference dataset: " + ", ".join(DATA_SUFFIXES),
                        }
                    },
                }
            }
        },
    }
}


# Each ReadLimits bound and the setting that sets it (named in the 413 answer).
LIMIT_SETTINGS = {
    "bytes": "TVKD_UPLOAD_MAX_DECOMPRESSED_BYTES",
    "rows": "TVKD_UPLOAD_MAX_ROWS",
    "a line": "TVKD_UPLOAD_MAX_LINE_BYTES",
}


def read_limits(settings: Settings) -> ReadLimits:
    """What reading one uploaded dataset may cost, after decompression (tvkd.sources.ReadLimits)."""
    return ReadLimits(
        max_bytes=settings.upload_max_decompressed_bytes,
        max_rows=settings.upload_max_rows,
        max_line_bytes=settings.upload_max_line_bytes,
        max_depth=settings.upload_max_depth,
    )


def _check_rows(path: str, filename: str, limits: ReadLimits) -> DataReport:
    try:
        _, report = load_pairs(path, on_error="raise", limits=limits)
    except DataError as exc:
        report = exc.report
        first = report.issues[0]
        if first.row == FILE_ROW and first.code == "too_large":
            setting = next(
                (v for k, v in LIMIT_SETTINGS.items() if f"(the limit of {k})" in first.message), None
            )
            message = f"{filename}: {first.message}" + (
                f"; the operator sets it with {setting}" if setting else ""
            )
            raise APIError(413, "upload_too_large", message, field="file") from exc
        if first.row == FILE_ROW:
            field, message = "file", f"{filename}: {first}"
        else:
            field = f"file.rows[{first.row}].{first.field}"
            message = (
                f"{filename}: {report.dropped} bad rows of {report.total_rows} "
                f"({len(report.issues)} issues); first: {first}"
            )
        details: list[dict[str, Any]] = [
            {"row": i.row, "field": i.field, "code": i.code, "message": i.message}
            for i in report.issues[:MAX_DETAILS]
        ]
        raise APIError(422, "invalid_dataset", message, field=field, details=details) from exc
    except (OSError, ValueError) as exc:
        reason = str(exc).replace(path, filename)  # the client knows its file, not our temp path
        raise invalid("file", f"cannot read the dataset: {reason}", code="invalid_dataset") from exc
    if report.kept == 0:
        raise invalid("file", "the dataset holds no preference pairs", code="invalid_dataset")
    return report


def _commit(request: Request, session: Session) -> None:
    with request.app.state.write_lock:
        session.commit()


@router.post(
    "",
    response_model=Dataset,
    status_code=201,
    summary="Upload a preference dataset (JSONL or Parquet)",
    openapi_extra=UPLOAD_BODY,
    responses=error_responses(401, 408, 413, 422),
)
async def upload_dataset(
    request: Request, settings: SettingsDep, session: SessionDep, owner: OwnerDep
) -> Dataset:
    artifacts = settings.artifacts
    tmp = await run_in_threadpool(incoming_dir, artifacts)
    try:
        received: ReceivedFile = await receive_file(
            request, tmp, limit=settings.max_upload_bytes, idle_seconds=settings.upload_idle_seconds
        )
        if not received.filename.lower().endswith(DATA_SUFFIXES):
            raise invalid(
                "file",
                f"unsupported file type {received.filename!r} (use {', '.join(DATA_SUFFIXES)})",
                code="unsupported_type",
            )
        report = await run_in_threadpool(
            _check_rows, str(received.path), received.filename, read_limits(settings)
        )
        report.source = received.filename  # not the temporary path it was checked at
        row = db.Dataset(
            owner_id=owner,
            filename=received.filename,
            path="",
            bytes=received.bytes,
            sha256=received.sha256,
            rows=report.total_rows,
            pairs=report.kept,
            report=report.to_dict(),
        )
        row.id = db.new_id("ds")
        final = artifacts / "datasets" / row.id
        row.path = str((final / received.filename).relative_to(artifacts))
        os.replace(tmp, final)  # atomic: the dataset folder appears complete or not at all
        try:
            session.add(row)
            await run_in_threadpool(_commit, request, session)
        except Exception:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return dataset_view(row)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@router.get(
    "",
    response_model=DatasetList,
    summary="Your uploaded datasets, newest first",
    responses=error_responses(401, 422),
)
@in_one_thread
def list_datasets(
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[
        str | None, Query(max_length=64, description="The last dataset id of the previous page.")
    ] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> DatasetList:
    query = select(db.Dataset).where(db.Dataset.owner_id == owner)
    page = newest_first(
        session,
        query,
        db.Dataset.created_at,
        db.Dataset.id,
        after=after,
        limit=limit,
        noun="dataset",
        cursor_where=db.Dataset.owner_id == owner,
        key_pattern=ID_RE,
    )
    return DatasetList(
        data=[dataset_view(d) for d in page.rows],
        has_more=page.has_more,
        next_after=page.next_after(lambda d: d.id),
    )


@router.get(
    "/{dataset_id}",
    response_model=Dataset,
    summary="One of your datasets",
    responses=error_responses(401, 404),
)
@in_one_thread
def get_dataset(
    dataset_id: Annotated[str, Path(description="A dataset id (`ds_…`).")],
    session: SessionDep,
    owner: OwnerDep,
) -> Dataset:
    checked_id(dataset_id, "dataset")
    row = session.scalar(select(db.Dataset).where(db.Dataset.id == dataset_id, db.Dataset.owner_id == owner))
    if row is None:
        raise not_found("dataset", dataset_id)
    return dataset_view(row)
