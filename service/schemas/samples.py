"""Samples and inspection: per-token signals (tvkd.artifacts.InspectResult's JSON form), a job's
samples, POST /v1/inspect, and the generation evaluation's answers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from service.hyperparams import top_level_field
from service.schemas.common import Name, NoNul, _Strict
from tvkd.config import QSource, Terminal


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
