"""The named choices of settings (each a `Literal`, and the tuple of its values)."""

from __future__ import annotations

import typing
from typing import Literal

QSource = Literal["logits", "logprobs", "implicit"]
Terminal = Literal["model", "zero", "pre_eos"]
Shaping = Literal["value", "logprob", "logit", "none"]
ParallelMode = Literal["auto", "ddp", "fsdp"]
JobKind = Literal["tvkd", "dpo", "sft"]
Truncation = Literal["none", "keep_start", "keep_end"]

Q_SOURCES: tuple[str, ...] = typing.get_args(QSource)
TERMINALS: tuple[str, ...] = typing.get_args(Terminal)
SHAPINGS: tuple[str, ...] = typing.get_args(Shaping)
JOB_KINDS: tuple[str, ...] = typing.get_args(JobKind)
# Experiment trackers a job can report to (TRL's `report_to` names); tvkd/trackers.py.
REPORTERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb")
TRUNCATIONS: tuple[str, ...] = typing.get_args(Truncation)
