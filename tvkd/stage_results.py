"""What the recipes of the train and evaluate stages return (`tvkd.trainer.Trainer.train`,
`tvkd.evaluate.Evaluator.run`): plain, torch-free records, paths as str. What they write to
disk for other processes is `tvkd.artifacts`' (result.json, samples.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainResult:
    """What `Trainer.train` did: status, metrics, the files it wrote (paths as str), counts, speed."""

    status: str  # "completed" | "stopped"
    steps: int
    total_steps: int
    metrics: dict[str, float]  # the last reported training metrics
    history: list[dict[str, Any]]  # every report of this run: {"step", "split", **metrics}
    output_dir: str
    model_dir: str | None
    adapter_dir: str | None
    checkpoint: str | None
    reference_path: str | None
    train_pairs: int
    eval_pairs: int
    dropped: list[dict[str, Any]]
    same_tokenizer: bool | None
    resumed_from: int | None
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """What `Evaluator.run` measured and wrote (paths as str)."""

    step: int  # the training step the model folder was saved at
    metrics: dict[str, float]  # held-out metrics, gen/* after training too ({} without held-out pairs)
    samples_path: str | None
    eval_pairs: int
    dropped: list[dict[str, Any]]
    seconds: float
    generations_path: str | None = None  # generations.json (with generation evaluation)
    before_metrics: dict[str, float] = field(default_factory=dict)  # gen/* of the untrained student

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
