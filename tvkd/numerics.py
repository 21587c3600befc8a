"""Numbers that are not finite never pass silently.

A NaN or an infinity anywhere in a run (a teacher whose logits overflow, a corrupted checkpoint,
hyperparameters that overflow the arithmetic) poisons every number computed from it, and
comparisons with NaN are False, so checks written as `if err > tol` pass it. Everything that
can carry one checks with `math.isfinite` / `np.isfinite` and raises `NonFiniteError`, whose
`code` is the job's error code:

    nonfinite_teacher    the teacher's logits or values are NaN/Inf (precompute, head check)
    nonfinite_store      a value store holds NaN/Inf (made before this check existed, or damaged)
    nonfinite_gradients  too many optimizer steps were skipped for a non-finite gradient norm
    nonfinite_result     a stage's result (metrics, timings) holds NaN/Inf
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

CODES = ("nonfinite_teacher", "nonfinite_store", "nonfinite_gradients", "nonfinite_result")


class NonFiniteError(ValueError):
    """A NaN or infinity where a finite number is required; `code` is one of `CODES`."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown non-finite error code {code!r}")
        super().__init__(message)
        self.code = code


def first_nonfinite(arrays: Mapping[str, Any]) -> str | None:
    """The name of the first array of `arrays` (name → array-like, None skipped) holding a NaN
    or an infinity, or None when all are finite."""
    for name, arr in arrays.items():
        if arr is not None and not np.isfinite(np.asarray(arr, dtype=np.float64)).all():
            return name
    return None


def nonfinite_paths(value: Any, path: str = "") -> Iterator[str]:
    """The JSON paths (`a.b[2]`) of every float in `value` (nested dicts, lists, tuples) that is
    NaN or infinite: JSON has no such numbers, and PostgreSQL refuses them in a JSON column."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield path or "(value)"
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from nonfinite_paths(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from nonfinite_paths(v, f"{path}[{i}]")
