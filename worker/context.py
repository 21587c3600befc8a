"""What every stage runner gets and shares: the job's `StageContext` (its stored spec resolved
under this worker's roots, the lease, the reporter), the `Outcome` a runner returns, the job's
folder, what validate prepared (`prepare`), the teacher's value store and the artifact rows.

Layout under the artifact root: `jobs/<job id>/` (the job's output: prepared.json, checkpoints,
reference log-probs, samples, model, result.json) and `values/<key>/` (teacher value stores,
shared by every job with the same content key).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service import jobstate
from service.db import transaction
from service.errors import APIError
from service.models import Artifact, Job, utcnow
from service.settings import Settings
from service.validation import job_spec
from tvkd import pipeline
from tvkd.config import JobSpec
from tvkd.models import ModelError
from tvkd.prepared import PREPARED_FILE, DatasetChanged, Prepared, load_prepared
from tvkd.store import ValueStore
from worker.reporting import JobReporter, StopFlags, relative_path, upsert

JOBS_DIR = "jobs"
VALUES_DIR = "values"


class DatasetNotFound(FileNotFoundError):
    """The job's dataset cannot be found under the data roots (or as an uploaded dataset)."""


def job_output_rel(job_id: str) -> str:
    return f"{JOBS_DIR}/{job_id}"


def output_dir(settings: Settings, job: Job) -> Path:
    return settings.artifacts / (job.output_dir or job_output_rel(job.id))


@dataclass
class Outcome:
    kind: Literal["advance", "succeeded", "stopped"]
    next_stage: str | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # merged into job.result
    job_values: dict[str, Any] = field(default_factory=dict)  # other job columns to set


def stored_spec(settings: Settings, factory: sessionmaker[Session], job: Job) -> JobSpec:
    """The job's stored spec with this worker's paths. Raises ModelError or DatasetNotFound
    when a name no longer resolves under the roots."""
    try:
        with factory() as session:
            return job_spec(
                settings,
                session,
                job,
                output_dir=str(output_dir(settings, job)),
                store_root=str(settings.artifacts / VALUES_DIR),
            )
    except APIError as exc:
        kind = ModelError if exc.code in ("invalid_model", "dependency_failed") else DatasetNotFound
        raise kind(f"{exc.field}: {exc.message}") from exc


@dataclass
class StageContext:
    app: Celery
    settings: Settings
    factory: sessionmaker[Session]
    job: Job  # detached snapshot taken when the lease was acquired
    token: str
    worker: str
    reporter: JobReporter
    flags: StopFlags

    @cached_property
    def spec(self) -> JobSpec:
        """The job's stored spec with this worker's paths (`stored_spec`)."""
        return stored_spec(self.settings, self.factory, self.job)

    @property
    def stage(self) -> str:
        return self.job.stage

    def rel(self, path: str | Path | None) -> str | None:
        return relative_path(path, self.settings.artifacts) if path else None

    def record(self, **values: Any) -> None:
        """Set data columns of the job row (service.jobstate.DATA_COLUMNS) while this worker
        holds the lease."""
        with transaction(self.factory) as session:
            jobstate.record(session, self.job.id, self.token, **values)


def prepare(ctx: StageContext) -> Prepared:
    """The pairs and split the validate stage prepared (raises DatasetChanged when the data
    differ now). A job validated before prepared.json existed is validated again, silently."""
    path = Path(ctx.spec.output_dir) / PREPARED_FILE
    if path.is_file():
        return load_prepared(ctx.spec, path)
    prepared = pipeline.validate(ctx.spec, ctx.reporter.silent())
    expected = ((ctx.job.result or {}).get("validate") or {}).get("dataset_fingerprint")
    if expected and prepared.dataset_fingerprint != expected:
        raise DatasetChanged(
            f"{ctx.job.dataset}: the dataset changed since the validate stage checked it "
            f"(fingerprint {prepared.dataset_fingerprint[:12]} != {expected[:12]}); submit a new job"
        )
    return prepared


def value_store(ctx: StageContext, prepared: Prepared) -> ValueStore | None:
    """The teacher's value store the precompute stage recorded (computed again when it is gone);
    None when the method uses no teacher."""
    spec = ctx.spec
    if not spec.uses_teacher:
        return None
    key = ctx.job.precompute_key
    store = ValueStore.find(spec.store_root, key) if key else None
    if store is None:
        ctx.reporter.event("warning", f"the value store {key} is gone: computing the teacher values again")
        store = pipeline.precompute(spec, prepared, ctx.reporter).store
    return store


def with_batch(spec: JobSpec, batch_size: int, grad_accum: int) -> JobSpec:
    return dataclasses.replace(
        spec, train=dataclasses.replace(spec.train, batch_size=batch_size, grad_accum=grad_accum)
    )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def record_artifacts(ctx: StageContext, paths: dict[str, str | Path | None]) -> None:
    rows = [
        {
            "job_id": ctx.job.id,
            "kind": kind,
            "path": ctx.rel(path),
            "bytes": _size(Path(path)),
            "created_at": utcnow(),
        }
        for kind, path in paths.items()
        if path and Path(path).exists()
    ]
    with transaction(ctx.factory) as session:
        upsert(session, Artifact, rows, keys=("job_id", "kind"), update_cols=("path", "bytes", "created_at"))
