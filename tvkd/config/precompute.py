"""`PrecomputeConfig`: the teacher pass that fills the value store (a job of its own: `tvkd
precompute`, and the service's precompute stage)."""

from __future__ import annotations

from dataclasses import dataclass

from tvkd.config.choices import QSource, Truncation
from tvkd.config.fields import _help, check_fields


@dataclass
class PrecomputeConfig:
    """The teacher pass that produces the value store (its fields are part of the content key)."""

    q_source: QSource = _help(
        "See MethodConfig.q_source ('implicit' runs teacher_reference too).", default="logits"
    )
    value_beta: float = _help("See MethodConfig.value_beta.", default=1.0, ge=1e-3, le=1e3)
    topk: int = _help("Also store the top-k teacher logits and ids per state (0 = off).", default=0, ge=0)
    token_stats: bool = _help(
        "Also store the teacher's log-prob and logit of each response token (needed by the "
        "'logprob'/'logit' shaping modes).",
        default=False,
    )
    max_length: int = _help(
        "Longest prompt+response in teacher tokens (capped at the teacher's context window); "
        "longer rows follow truncation_mode.",
        default=1024,
        ge=2,
    )
    truncation_mode: Truncation = _help("See TrainConfig.truncation_mode.", default="none")
    batch_tokens: int = _help(
        "Token budget of one teacher batch (rows are batched by length).", default=8192, ge=1
    )
    chunk_size: int = _help("Positions per chunk of the vocabulary-wide logsumexp.", default=256, ge=1)
    bf16: bool = _help(
        "Run the teacher's transformer under bf16 autocast (values stay float32).", default=False
    )
    shard_size: int = _help(
        "Pairs per store shard; a killed precompute resumes at shard granularity.", default=256, ge=1
    )

    def __post_init__(self) -> None:
        check_fields(self)
