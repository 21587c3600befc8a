"""Does the teacher's shaping carry the data's preference? (MATH.md, "Metrics": teacher check.)

Computed once per precompute, on the training pairs, from the value store alone (no model):
per pair, Σψ(y_w) and Σψ(y_l) exactly as the loss forms them from the stored signals (the
method's shaping mode, γ, terminal, length normalisation; teacher tokenization), and

    teacher/shaping_accuracy = fraction of pairs with Σψ(y_w) > Σψ(y_l)

with its Wilson 95% interval. When the interval contains 0.5 the teacher's values rank pairs no
better than chance on this data, and the job says so in a warning event.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tvkd.config import MethodConfig
from tvkd.store import SIDES, ValueStore

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class TeacherCheck:
    """The teacher check of one store on a set of pairs."""

    pairs: int  # pairs with values in the store
    accuracy: float  # fraction with Σψ(y_w) > Σψ(y_l); NaN when pairs == 0
    low: float  # Wilson 95% interval of `accuracy`
    high: float
    ties: float  # fraction with Σψ(y_w) == Σψ(y_l)

    @property
    def chance(self) -> bool:
        """No evidence of a preference signal: the interval contains 0.5, or every pair ties
        (e.g. V ≡ 0), or there are no pairs."""
        return not self.pairs or self.low <= 0.5 <= self.high or self.ties == 1.0

    def metrics(self) -> dict[str, float]:
        """Metric names of MATH.md (logged with split "teacher" at step 0); {} without pairs."""
        if not self.pairs:
            return {}
        return {
            "teacher/shaping_accuracy": self.accuracy,
            "teacher/shaping_accuracy_low": self.low,
            "teacher/shaping_accuracy_high": self.high,
            "teacher/shaping_ties": self.ties,
            "teacher/pairs": float(self.pairs),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
        return {**out, "chance": self.chance}

    def message(self) -> str:
        text = (
            f"teacher shaping accuracy {self.accuracy:.1%} on {self.pairs} training pairs "
            f"(95% interval {self.low:.1%}–{self.high:.1%}; ties {self.ties:.1%})"
        )
        if self.chance:
            why = "every pair ties" if self.pairs and self.ties == 1.0 else "the interval includes 50%"
            text += (
                f": {why}, so the teacher's values carry no measurable preference "
                "signal on this data (MATH.md, 'Measured caution': another q_source or terminal may)"
            )
        return text


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _shaping_sum(values: np.ndarray, stats: dict[str, np.ndarray | None], method: MethodConfig) -> float:
    """Σψ of one response from its stored signals (teacher tokenization), as `tvkd.losses` forms it."""
    from tvkd.losses import shaping_terms

    n = len(values) - 1
    as64 = {
        k: None if v is None else torch.from_numpy(np.array(v, np.float64))[None] for k, v in stats.items()
    }
    psi = shaping_terms(
        method.shaping,
        torch.from_numpy(np.array(values, np.float64))[None],
        torch.ones(1, n, dtype=torch.bool),
        gamma=method.gamma,
        terminal=method.terminal,
        teacher_logps=as64["logps"],
        teacher_logits=as64["logits"],
        value_beta=method.value_beta,
    )
    total = float(psi.sum())
    return total / max(n, 1) if method.length_normalize else total


def teacher_check(store: ValueStore, indices: Iterable[int], method: MethodConfig) -> TeacherCheck:
    """The teacher check of `store` on the pairs `indices` (pairs missing from the store skipped).

    Raises ValueError (from `tvkd.losses.shaping_terms`) when the shaping mode needs token
    statistics that the store does not hold."""
    wins = ties = n = 0
    for i in indices:
        if i not in store:
            continue
        pv = store.pair(i)
        sums = [
            _shaping_sum(
                getattr(pv, f"{s}_values"),
                {"logps": getattr(pv, f"{s}_token_logps"), "logits": getattr(pv, f"{s}_token_logits")},
                method,
            )
            for s in SIDES
        ]
        n += 1
        wins += sums[0] > sums[1]
        ties += sums[0] == sums[1]
    low, high = wilson_interval(wins, n)
    return TeacherCheck(
        pairs=n, accuracy=wins / n if n else math.nan, low=low, high=high, ties=ties / n if n else math.nan
    )
