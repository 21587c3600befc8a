"""The other resources' bodies: datasets, models, precomputes, health and webhook deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class Dataset(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    filename: str
    bytes: int
    sha256: str
    rows: int
    pairs: int
    created_at: datetime


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Dataset]
    has_more: bool
    next_after: str | None


class ModelInfo(BaseModel):
    id: str = Field(description="The name to use as teacher/student: the path relative to its root.")
    object: Literal["model"] = "model"
    root: str = Field(
        description="Which model root holds it: `model_roots[i]`, i its place in TVKD_MODEL_ROOTS."
    )
    architecture: str | None
    model_type: str | None
    params: int | None = Field(description="Stored weights, from the safetensors headers.")
    has_chat_template: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    has_more: bool
    next_after: str | None


class Precompute(BaseModel):
    key: str
    object: Literal["precompute"] = "precompute"
    status: str
    teacher: str
    path: str
    pairs: int
    tokens: int
    bytes: int
    fields: dict[str, Any]
    job_id: str | None = Field(description="The job that computed it, when that job is yours (else null).")
    created_at: datetime
    completed_at: datetime | None


class PrecomputeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Precompute]
    has_more: bool
    next_after: str | None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(description="database, migrations, broker: 'ok' or the reason.")


class WebhookAttempt(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status, or null when none came.")
    error: str | None
    seconds: float


class WebhookDeliveryView(BaseModel):
    id: int
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_id: str = Field(description="The payload's `id` (also the `Tvkd-Event-Id` header).")
    event: str
    status: str = Field(description="The job status the event announces.")
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried again.")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    log: list[WebhookAttempt]


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    url: str | None = Field(description="The job's webhook URL (null: none).")
    data: list[WebhookDeliveryView]
    has_more: bool
    next_after: int | None
