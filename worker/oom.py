"""Out-of-memory in a stage: retry with about half the micro-batch and twice the gradient
accumulation (the same effective batch and data order), from the last checkpoint, a few times;
the smaller batch is stored in the job's spec so a resume after a crash keeps it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TypeVar

from worker.context import StageContext

T = TypeVar("T")
OOM_RETRIES = 3


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def smaller_batch(batch_size: int, grad_accum: int) -> tuple[int, int] | None:
    """(batch_size, grad_accum) with about half the micro-batch and the same effective batch
    (batch_size × grad_accum, which also keeps the data order of each step); None at 1."""
    if batch_size <= 1:
        return None
    new = next(d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0)
    return new, grad_accum * (batch_size // new)


def retry_on_oom(
    run: Callable[[int, int], T],
    batch_size: int,
    grad_accum: int,
    *,
    on_retry: Callable[[BaseException, tuple[int, int], tuple[int, int], int], None],
    retries: int = OOM_RETRIES,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """run(batch_size, grad_accum); on out-of-memory, retry with a smaller micro-batch and a
    backoff, at most `retries` times (then, or at batch_size 1, the error propagates)."""
    attempt = 0
    while True:
        try:
            return run(batch_size, grad_accum)
        except Exception as exc:
            smaller = smaller_batch(batch_size, grad_accum)
            if not is_out_of_memory(exc) or attempt >= retries or smaller is None:
                raise
            attempt += 1
            free_memory()
            on_retry(exc, (batch_size, grad_accum), smaller, attempt)
            sleep(min(2.0**attempt, 30.0))
            batch_size, grad_accum = smaller


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def smaller_batch_recorder(
    ctx: StageContext,
) -> Callable[[BaseException, tuple[int, int], tuple[int, int], int], None]:
    """retry_on_oom's `on_retry`: stores the smaller batch in the job's spec and says so."""

    def on_retry(exc: BaseException, old: tuple[int, int], new: tuple[int, int], n: int) -> None:
        stored = ctx.job.spec
        job_spec = {**stored, "train": {**stored["train"], "batch_size": new[0], "grad_accum": new[1]}}
        ctx.job.spec = job_spec  # a resume after a crash keeps the smaller batch too
        ctx.record(spec=job_spec)
        ctx.reporter.event(
            "warning",
            f"out of memory at batch_size={old[0]} (grad_accum={old[1]}): retrying from the last checkpoint "
            f"with batch_size={new[0]}, grad_accum={new[1]} (same effective batch), try {n} of {OOM_RETRIES}",
            {"error": str(exc)[:500], "batch_size": new[0], "grad_accum": new[1]},
        )

    return on_retry
