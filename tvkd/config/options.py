"""`JobOptions`: what one job sets beyond its training settings (which rows it reads and how, the
teacher's reference model, the trackers, the generation evaluation); shared by every job kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tvkd.config.choices import REPORTERS
from tvkd.config.fields import ConfigError, _build, _help, check_fields


@dataclass
class JobOptions:
    """Options of one job beyond its training settings: which rows it reads and how, the
    teacher's reference model (a model reference, resolved like `teacher`), the trackers, and
    what the evaluate stage's generation evaluation does (`tvkd.generation`)."""

    teacher_reference: str | None = _help(
        "The model the teacher was DPO-trained from (e.g. its SFT checkpoint; same tokenizer as "
        "the teacher). Needed by q_source='implicit' (MATH.md, 'Teacher soft value').",
        default=None,
    )
    eval_dataset: str | None = _help(
        "Held-out pairs (same rules as `dataset`); default: `eval_fraction` of the dataset.", default=None
    )
    limit: int | None = _help("Read only the first N rows of each dataset.", default=None, ge=1)
    on_error: Literal["drop", "raise"] = _help(
        "Bad rows: 'drop' them (reported in events) or 'raise' (fail).", default="drop"
    )
    precompute_bf16: bool = _help(
        "Run the teacher pass under bf16 autocast (values stay float32).", default=False
    )
    report_to: list[str] = _help(
        "Experiment trackers that receive the metrics, the settings and the model's path (TRL's "
        "`report_to`); where their runs go is the machine's setting (README: Experiment trackers).",
        default_factory=list,
        choices=REPORTERS,
    )
    gen_prompts: int = _help(
        "Held-out prompts the evaluate stage answers greedily before and after training, scored "
        "into gen/gold_accuracy, gen/reward and gen/win_rate (0: no generation evaluation).",
        default=0,
        ge=0,
        le=256,
    )
    gen_max_new_tokens: int = _help("Longest greedy answer, in student tokens.", default=64, ge=1, le=1024)
    reward_model: str | None = _help(
        "A Hugging Face sequence-classification folder that scores the answers (gen/reward).", default=None
    )

    def __post_init__(self) -> None:
        if isinstance(self.report_to, tuple):  # a tuple of names is taken too
            self.report_to = list(self.report_to)
        check_fields(self)
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError("report_to", f"names a tracker twice: {self.report_to}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobOptions:
        return _build(cls, data)
