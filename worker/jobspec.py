"""A job row → the library's `JobSpec`, with every name resolved under the configured roots.

The API already checked the names at submit time; they are resolved again here because the
worker may run on another host with other mounts, and because a file can change in between.
Layout under the artifact root: `jobs/<job id>/` (the job's output: checkpoints, reference
log-probs, samples, model, result.json) and `values/<key>/` (teacher value stores, shared by
every job with the same content key).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.models import Dataset, Job
from service.settings import Settings
from tvkd.config import ConfigError, TrainConfig
from tvkd.models import ModelError, resolve_model_path
from tvkd.pipeline import JobSpec

JOBS_DIR = "jobs"
VALUES_DIR = "values"
# Hyperparameters that are options of the job rather than of the TrainConfig.
SPEC_OPTIONS = ("eval_dataset", "limit", "on_error", "precompute_bf16")


class DatasetNotFound(FileNotFoundError):
    """The job's dataset cannot be found under the data roots (or as an uploaded dataset)."""


def job_output_rel(job_id: str) -> str:
    return f"{JOBS_DIR}/{job_id}"


def resolve_dataset(
    name: str, settings: Settings, factory: sessionmaker[Session] | None = None, *, field: str = "dataset"
) -> str:
    """An uploaded dataset id (`ds_…`, stored under the artifact root) or a path under the data roots."""
    if name.startswith("ds_") and factory is not None:
        with factory() as session:
            row = session.get(Dataset, name)
        if row is not None:
            return str(settings.artifacts / row.path)
    try:
        return resolve_model_path(name, roots=settings.resolved_data_roots, allow_hub=settings.allow_hub)
    except ModelError as exc:
        raise DatasetNotFound(f"{field}: {str(exc).replace('model', 'dataset', 1)}") from exc


def train_config(job: Job) -> TrainConfig:
    hp = {k: v for k, v in (job.hyperparameters or {}).items() if k not in SPEC_OPTIONS}
    return TrainConfig.from_dict({**hp, "alpha": job.alpha, "beta": job.beta})


def build_spec(job: Job, settings: Settings, factory: sessionmaker[Session] | None = None) -> JobSpec:
    """Raises ConfigError (a setting), ModelError (a model name) or DatasetNotFound."""
    cfg = train_config(job)
    hp: dict[str, Any] = job.hyperparameters or {}
    roots = settings.resolved_model_roots
    student = resolve_model_path(job.student, roots=roots, allow_hub=settings.allow_hub)
    teacher = (
        resolve_model_path(job.teacher, roots=roots, allow_hub=settings.allow_hub)
        if job.teacher and cfg.method.uses_teacher
        else None
    )
    eval_dataset = hp.get("eval_dataset")
    on_error = hp.get("on_error", "drop")
    if on_error not in ("drop", "raise"):
        raise ConfigError("on_error", f"must be 'drop' or 'raise'; got {on_error!r}")
    return JobSpec(
        teacher=teacher,
        student=student,
        dataset=resolve_dataset(job.dataset, settings, factory),
        train=cfg,
        output_dir=str(settings.artifacts / (job.output_dir or job_output_rel(job.id))),
        store_root=str(settings.artifacts / VALUES_DIR),
        device=settings.torch_device,
        eval_dataset=resolve_dataset(eval_dataset, settings, factory, field="eval_dataset")
        if eval_dataset
        else None,
        on_error=on_error,
        limit=hp.get("limit"),
        precompute_bf16=bool(hp.get("precompute_bf16", False)),
    )


def with_batch(spec: JobSpec, batch_size: int, grad_accum: int) -> JobSpec:
    return dataclasses.replace(
        spec, train=dataclasses.replace(spec.train, batch_size=batch_size, grad_accum=grad_accum)
    )


def output_dir(settings: Settings, job: Job) -> Path:
    return settings.artifacts / (job.output_dir or job_output_rel(job.id))
