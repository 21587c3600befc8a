"""The job bodies: `JobCreate` (POST /v1/jobs; alpha, beta and the hyperparameters from the config
dataclasses' declarations, service/hyperparams.py) and a job's views: status, progress, events,
metrics, checkpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.hyperparams import Hyperparameters, top_level_field
from service.schemas.common import MetaKey, MetaValue, Name, _Strict
from service.statemachine import STAGES, Status
from tvkd.config import JOB_KINDS

# The job statuses of the state machine, as an inline enum of strings in the OpenAPI document.
JobStatus = Literal[tuple(s.value for s in Status)]  # type: ignore[valid-type]


JobKind = Literal[JOB_KINDS]  # type: ignore[valid-type]


class WebhookSpec(_Strict):
    """Where to POST the job's status changes (README: Webhooks)."""

    url: str = Field(
        min_length=1,
        max_length=2000,
        description="http(s) URL; loopback hosts, or hosts the server allows (TVKD_WEBHOOK_ALLOWED_HOSTS).",
    )
    secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=200,
        description="HMAC-SHA256 key of the `Tvkd-Signature` header (never shown again); default: the "
        "server's TVKD_WEBHOOK_SECRET.",
    )


class JobCreate(_Strict):
    """A job: the body of POST /v1/jobs."""

    kind: JobKind = Field(
        default="tvkd",
        description="'tvkd': distil the teacher into the student (TVKD; alpha 0 is DPO with the teacher "
        "still named); 'dpo': plain DPO, no teacher (alpha 0, no teacher pass); 'sft': supervised "
        "fine-tuning of `student` on the chosen responses or prompt/completion rows (no teacher, "
        "no alpha/beta; `hyperparameters` are SFTConfig's and the job options).",
    )
    teacher: Name | None = Field(
        default=None,
        description="Teacher model (kind 'tvkd' only, required there): a folder name relative to a "
        "TVKD_MODEL_ROOTS root, an absolute path inside one, (with TVKD_ALLOW_HUB) a Hugging Face hub "
        "id, or `job:<id>`: the model another of your jobs makes (this job waits for it). Checked even "
        "when alpha=0.",
    )
    student: Name = Field(
        description="Student model to train (initial weights), same rules as teacher (`job:<id>` too)."
    )
    dataset: Name = Field(
        description="Preference data: a file or `datasets` folder relative to a TVKD_DATA_ROOTS root, an "
        "absolute path inside one, or the id (`ds_…`) of a dataset this key uploaded."
    )
    alpha: float = top_level_field("alpha")
    beta: float = top_level_field("beta")
    hyperparameters: Hyperparameters = Field(  # type: ignore[valid-type]
        default_factory=Hyperparameters, description="Every other setting; omitted ones take defaults."
    )
    metadata: dict[MetaKey, MetaValue] = Field(
        default_factory=dict,
        max_length=16,
        description="Up to 16 string pairs of your own, kept with the job.",
    )
    webhook: WebhookSpec | None = Field(
        default=None,
        description="A signed POST at each status change; default: the server's TVKD_WEBHOOK_URL, if any.",
    )


class Progress(BaseModel):
    done: int = Field(description="Units of the current stage done (steps, pairs).")
    total: int = Field(description="Units of the current stage in all (0 = not known yet).")
    fraction: float | None = Field(description="done/total, or null when the total is not known.")
    eta_seconds: float | None = Field(description="Estimated seconds left in the current stage.")


class JobErrorInfo(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    kind: JobKind
    status: JobStatus
    stage: str = Field(description="The stage that runs, or runs next: " + ", ".join(STAGES) + ".")
    progress: Progress
    teacher: str | None
    student: str
    dataset: str
    depends_on: dict[str, str] = Field(
        description="The jobs whose models this one uses, by field ({'teacher': 'job_…'}): a `waiting` "
        "job starts once they have all succeeded, and fails (`dependency_failed`) if one does not."
    )
    alpha: float | None = Field(description="null for an 'sft' job.")
    beta: float | None = Field(description="null for an 'sft' job.")
    hyperparameters: dict[str, Any] = Field(description="Every setting, defaults filled in.")
    metadata: dict[str, Any]
    warnings: list[str] = Field(description="Legal settings that are probably not what was meant.")
    error: JobErrorInfo | None
    result: dict[str, Any] | None = Field(description="Final metrics once the job has succeeded.")
    model_path: str | None = Field(
        description="The trained model folder, relative to the artifact root (succeeded jobs)."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    next_after: str | None = Field(description="Pass as `after` to get the next page (null on the last).")


class Event(BaseModel):
    id: int
    object: Literal["event"] = "event"
    created_at: datetime
    level: str
    stage: str | None
    message: str
    data: dict[str, Any]


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool
    next_after: int | None


class MetricPoint(BaseModel):
    id: int
    step: int
    split: str
    name: str
    value: float | None = Field(description="null for a non-finite value (JSON has no NaN).")
    created_at: datetime


class MetricList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricPoint]
    has_more: bool
    next_after: int | None


class MetricSeries(BaseModel):
    split: str
    name: str
    steps: list[int]
    values: list[float | None]


class MetricSeriesList(BaseModel):
    object: Literal["metric_series"] = "metric_series"
    data: list[MetricSeries]


class Checkpoint(BaseModel):
    id: int
    object: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str = Field(description="Relative to the artifact root.")
    created_at: datetime


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool
    next_after: int | None
