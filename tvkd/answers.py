"""`generations.json`: the student's greedy answers to held-out prompts before and after
training, with their scores, as a typed, versioned record (one writer, one reader).

Written by the evaluate stage (`tvkd.generation.evaluate_generation`), read by the API
(`GET /v1/jobs/{id}/generations`, shown beside each other on the dashboard's job page) and by
the library. The document:

    {"version": 1, "step": int, "max_new_tokens": int,
     "scorers": {"gold": checker name | null, "reward": reward model name | null,
                 "teacher": "implicit" | null},
     "before": {metric: float}, "after": {metric: float},   # gen/gold_accuracy, gen/reward, ...
     "generations": [
       {"index": int, "row": int, "prompt": str | [messages], "win": 0 | 0.5 | 1 | null,
        "before": {"text": str, "gold": bool | null, "reward": float | null,
                   "teacher_reward": float | null},
        "after": {...}}, ...]}

`win` is 1 when the teacher's implicit reward ranks the answer after training above the one
before, 0 below, 0.5 on a tie (null without a teacher reference). Standard library only, like
`tvkd.artifacts`, whose conventions it follows: a newer version is refused with
`ArtifactError`; fields of the wrong type read as missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tvkd.artifacts import ArtifactError, _dict, _int, _load, _num
from tvkd.atomic import strict_json, write_json_atomic

GENERATIONS_FILE = "generations.json"
GENERATIONS_VERSION = 1
WHEN = ("before", "after")
# The metrics of the generation evaluation (the job's metrics: `before` at step 0, `after` and
# the win rate at the last step).
GOLD, REWARD, TEACHER_REWARD, WIN_RATE = (
    "gen/gold_accuracy",
    "gen/reward",
    "gen/teacher_reward",
    "gen/win_rate",
)


@dataclass
class Answer:
    """One greedy answer and its scores (None: that scorer was not used, or could not score it)."""

    text: str
    gold: bool | None = None
    reward: float | None = None
    teacher_reward: float | None = None

    @classmethod
    def parse(cls, data: Any) -> Answer:
        data = _dict(data)
        gold = data.get("gold")
        return cls(
            text=str(data.get("text", "")),
            gold=gold if isinstance(gold, bool) else None,
            reward=_num(data.get("reward")),
            teacher_reward=_num(data.get("teacher_reward")),
        )


@dataclass
class Generation:
    """A held-out prompt (its pair's `index` and source `row`) and the two answers to it."""

    index: int | None
    row: int | None
    prompt: str | list[dict[str, Any]]
    before: Answer
    after: Answer
    win: float | None = None

    @classmethod
    def parse(cls, data: Any) -> Generation:
        data = _dict(data)
        prompt = data.get("prompt", "")
        return cls(
            index=_int(data.get("index")),
            row=_int(data.get("row")),
            prompt=prompt if isinstance(prompt, str | list) else str(prompt),
            before=Answer.parse(data.get("before")),
            after=Answer.parse(data.get("after")),
            win=_num(data.get("win")),
        )


@dataclass
class GenerationsFile:
    """A job's generations.json (see the module doc)."""

    generations: list[Generation]
    step: int | None = None
    max_new_tokens: int | None = None
    scorers: dict[str, str | None] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    version: int = GENERATIONS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "step": self.step,
            "max_new_tokens": self.max_new_tokens,
            "scorers": self.scorers,
            "before": self.before,
            "after": self.after,
            "generations": [asdict(g) for g in self.generations],
        }


def _metrics(data: Any) -> dict[str, float]:
    return {str(k): v for k, v in ((k, _num(v)) for k, v in _dict(data).items()) if v is not None}


def write_generations(path: str | os.PathLike[str], doc: GenerationsFile) -> Path:
    """Write generations.json atomically (non-finite numbers as null)."""
    return write_json_atomic(path, strict_json(doc.to_dict()))


def read_generations(path: str | os.PathLike[str]) -> GenerationsFile:
    """Read generations.json (`path`: the file or the run folder holding it). Raises ArtifactError
    when it cannot be read, is no generations document, or is of a newer version."""
    p = Path(path)
    if p.is_dir():
        p = p / GENERATIONS_FILE
    data, version = _load(p, "generations", GENERATIONS_VERSION)
    if not isinstance(data, Mapping) or not isinstance(data.get("generations"), list):
        raise ArtifactError(f"{p}: expected a generations document with a 'generations' list")
    scorers = _dict(data.get("scorers"))
    return GenerationsFile(
        generations=[Generation.parse(g) for g in data["generations"]],
        step=_int(data.get("step")),
        max_new_tokens=_int(data.get("max_new_tokens")),
        scorers={str(k): v if isinstance(v, str) else None for k, v in scorers.items()},
        before=_metrics(data.get("before")),
        after=_metrics(data.get("after")),
        version=version,
    )
