"""Request and response bodies of the REST API (pydantic). Kept apart from the database models
(service.models): these are the public contract, those are storage."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.hyperparams import Hyperparameters, top_level_field
from service.statemachine import STAGES, Status
from tvkd.config import JOB_KINDS, QSource, Terminal

# The job statuses of the state machine, as an inline enum of strings in the OpenAPI document.
JobStatus = Literal[tuple(s.value for s in Status)]  # type: ignore[valid-type]

# Names and free text that reach the file system or the database: no NUL (PostgreSQL text cannot
# hold it, paths cannot contain it); lone surrogates are refused by pydantic's str itself.
NoNul = r"^[^\x00]*$"
Name = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=NoNul)]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NoNul)]
MetaValue = Annotated[str, StringConstraints(max_length=512, pattern=NoNul)]
Text = Annotated[str, StringConstraints(pattern=NoNul)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# --------------------------------------------------------------------------------------------
# Errors


class ErrorInfo(BaseModel):
    code: str = Field(description="Machine-readable code, e.g. invalid_value, not_found, unauthorized.")
    message: str = Field(description="What went wrong, for people.")
    field: str | None = Field(
        description="The request part at fault: a dotted path into the body or query "
        "(`hyperparameters.learning_rate`, `prompt[1].content`), a header name "
        "(`Idempotency-Key`), or null."
    )
    details: list[dict[str, Any]] = Field(
        description="Every problem found (e.g. each invalid field, or each bad row of an upload)."
    )


class ErrorBody(BaseModel):
    error: ErrorInfo


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entry declaring the error body for each status code."""
    words = {
        401: "Missing or invalid API key.",
        404: "No such object (or it belongs to another key).",
        408: "The upload's body stalled (nothing for TVKD_UPLOAD_IDLE_SECONDS).",
        409: "The request conflicts with the object's state.",
        413: "The body is larger than a limit (TVKD_MAX_UPLOAD_BYTES, TVKD_MAX_JSON_BODY_BYTES, "
        "TVKD_UPLOAD_MAX_* after decompression); the message names it.",
        422: "Invalid request; `error.field` names the field.",
        503: "Unavailable for now (the database cannot be reached): retry after `Retry-After` seconds.",
    }
    return {code: {"model": ErrorBody, "description": words.get(code, "Error.")} for code in codes}


# --------------------------------------------------------------------------------------------
# Jobs


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


# --------------------------------------------------------------------------------------------
# Samples and inspection (per-token signals; tvkd.artifacts.InspectResult's JSON form)


class TokenSignal(BaseModel):
    index: int
    id: int
    text: str
    value: float | None = Field(description="V_φ(s_t), the teacher's soft value at the token's state.")
    psi: float | None = Field(description="ψ_t, the shaping term (α not applied).")
    teacher_logp: float | None = Field(description="log π_φ(y_t|s_t); null when tokenizations differ.")
    logratio: float | None = Field(description="β·(log π_θ − log π_ref)(y_t|s_t); null without a student.")


class SideSummary(BaseModel):
    text: str
    tokens: int
    sum_psi: float | None
    sum_logratio: float | None
    value_end: float | None


class SampleSummary(BaseModel):
    k: int = Field(description="Position in the job's samples; GET /samples/{k} gives its tokens.")
    index: int | None
    row: int | None
    prompt: str | list[dict[str, Any]]
    chosen: SideSummary
    rejected: SideSummary


class SampleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SampleSummary]
    has_more: bool
    next_after: int | None
    step: int | None = Field(description="Training step the samples were written at.")


class InspectSide(BaseModel):
    prompt: str | list[dict[str, Any]]
    response: str
    tokens: list[TokenSignal]
    sum_psi: float | None
    sum_logratio: float | None
    value_start: float | None
    value_end: float | None
    method: dict[str, Any]
    tokenization: Literal["teacher", "student"]
    side: str | None


class SampleDetail(BaseModel):
    object: Literal["sample"] = "sample"
    k: int
    index: int | None
    row: int | None
    step: int | None
    chosen: InspectSide
    rejected: InspectSide


class AnswerView(BaseModel):
    text: str
    gold: bool | None = Field(description="The dataset's gold checker accepts it; null without one.")
    reward: float | None = Field(description="The reward model's score; null without `reward_model`.")
    teacher_reward: float | None = Field(
        description="The teacher's implicit reward Σ log π_φ/π_φref; null without a teacher reference."
    )


class GenerationView(BaseModel):
    k: int = Field(description="Position in the job's generations.")
    index: int | None
    row: int | None
    prompt: str | list[dict[str, Any]]
    before: AnswerView = Field(description="The untrained student's greedy answer.")
    after: AnswerView = Field(description="The trained student's greedy answer.")
    win: float | None = Field(
        description="1 when the teacher ranks `after` above `before`, 0 below, 0.5 tie."
    )


class GenerationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[GenerationView]
    has_more: bool
    next_after: int | None
    step: int | None = Field(description="Training step of the answers after training.")
    max_new_tokens: int | None
    scorers: dict[str, str | None] = Field(description="Which scorers ran: gold, reward, teacher.")
    before: dict[str, float] = Field(description="gen/* metrics of the untrained student.")
    after: dict[str, float] = Field(description="gen/* metrics of the trained student (and gen/win_rate).")


class Message(_Strict):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NoNul)]
    content: Annotated[str, StringConstraints(max_length=20_000, pattern=NoNul)]


class InspectRequest(_Strict):
    """POST /v1/inspect: per-token values and shaping of one response under a teacher."""

    teacher: Name = Field(description="Teacher model, same rules as a job's teacher.")
    prompt: (
        Annotated[str, StringConstraints(max_length=20_000, pattern=NoNul)]
        | Annotated[list[Message], Field(min_length=1, max_length=64)]
    ) = Field(description="Prompt text, or chat messages rendered with the teacher's chat template.")
    response: Annotated[str, StringConstraints(min_length=1, max_length=8_000, pattern=NoNul)] = Field(
        description="The response to inspect (its tokens are the rows of the answer)."
    )
    alpha: float = top_level_field("alpha")
    beta: float = top_level_field("beta")
    value_beta: float = Field(default=1.0, gt=0.0, allow_inf_nan=False, description="β_v of V.")
    gamma: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False, description="Discount γ of ψ.")
    terminal: Terminal = Field(
        default="model",
        description="'model': V(s_{T+1}) from the teacher; 'zero': V(s_{T+1}) := 0; 'pre_eos': "
        "V(s_{T+1}) := V(s_T), the state before the end token.",
    )
    q_source: QSource = Field(
        default="logits",
        description="Q = the teacher's logits, or its log-probabilities; 'implicit': V = β_v·Σ log "
        "π_φ/π_φref, the teacher's DPO reward (needs teacher_reference).",
    )
    teacher_reference: Name | None = Field(
        default=None,
        description="The model the teacher was DPO-trained from, same rules as teacher; needed by "
        "q_source='implicit'.",
    )
    shaping: Literal["value", "logprob", "logit", "none"] = Field(
        default="value", description="ψ_t: potential-based 'value' (default), or an ablation."
    )
    max_length: int = Field(default=1024, ge=2, le=4096, description="Longest prompt+response in tokens.")


class InspectResponse(InspectSide):
    object: Literal["inspection"] = "inspection"


# --------------------------------------------------------------------------------------------
# Datasets, models, precomputes


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


# --------------------------------------------------------------------------------------------
# Health


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
