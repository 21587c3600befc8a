"""The whole job in one process (the CLI's `tvkd train`, the library): validate → precompute →
train → evaluate, chaining the stage functions of `tvkd.pipeline`, then `output_dir/result.json`
(`tvkd.artifacts.ResultFile`, also when stopped). The service runs the same stages one Celery task
each (worker/stages.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvkd import distributed
from tvkd.artifacts import RESULT_FILE, ResultFile, ResultPaths, write_result
from tvkd.callbacks import Callbacks
from tvkd.config import JobSpec
from tvkd.evaluate import EvalResult
from tvkd.parallel import rank_callbacks
from tvkd.pipeline import open_job_trackers, precompute, run_evaluation, run_training, validate
from tvkd.prepared import Prepared
from tvkd.trackers import TrackerSettings
from tvkd.trainer import TrainResult


@dataclass
class JobResult:
    status: str  # "completed" | "stopped"
    prepared: Prepared
    precompute: Any  # PrecomputeResult | None
    train: TrainResult | None
    evaluation: EvalResult | None
    timings: dict[str, float]
    result_path: str


def run_job(
    spec: JobSpec,
    callbacks: Callbacks | None = None,
    *,
    resume: bool = True,
    trackers: TrackerSettings | None = None,
) -> JobResult:
    """validate → precompute → train → evaluate; writes output_dir/result.json (also when stopped).
    The job's trackers keep one run from the train stage to the end of the evaluate stage."""
    tracker, cb = open_job_trackers(spec, trackers, callbacks or Callbacks())
    try:
        job = _run_job(spec, cb or Callbacks(), resume=resume)
    except BaseException:
        if tracker is not None:
            tracker.close(None, "failed")
        raise
    if tracker is not None:
        train = job.train
        tracker.close(train.model_dir if train else None, train.status if train else "stopped")
    return job


def _run_job(spec: JobSpec, cb: Callbacks, *, resume: bool) -> JobResult:
    from tvkd.precompute import PrecomputeStopped

    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cb = rank_callbacks(cb)  # under torchrun: rank 0 reports, every rank trains (tvkd.parallel)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    prepared = validate(spec, cb)
    timings["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    pre, result, evaluation, status = None, None, None, "stopped"
    try:
        pre = precompute(spec, prepared, cb)
    except PrecomputeStopped:
        cb.on_event("info", "stopped during the teacher precompute (finished shards are kept)")
    timings["precompute"] = time.perf_counter() - t
    if pre is not None or not spec.uses_teacher:
        t = time.perf_counter()
        store = pre.store if pre is not None else None
        result = run_training(spec, prepared, store, cb, resume)
        timings["train"] = time.perf_counter() - t
        status = result.status
        if not distributed.context().is_main:  # rank 0 evaluates the saved model, writes result.json
            return JobResult(status, prepared, pre, result, None, timings, str(out / RESULT_FILE))
    if result is not None and result.status == "completed":
        t = time.perf_counter()
        store = pre.store if pre is not None else None
        evaluation = run_evaluation(spec, prepared, store, cb, step=result.steps)
        timings["evaluate"] = time.perf_counter() - t
        if evaluation.before_metrics:  # the generation evaluation's untrained student
            result.history.append({"step": 0, "split": "eval", **evaluation.before_metrics})
        if evaluation.metrics:
            result.history.append({"step": result.steps, "split": "eval", **evaluation.metrics})
    record = ResultFile(
        status=status,
        steps=result.steps if result else 0,
        metrics=result.metrics if result else {},
        eval_metrics=evaluation.metrics if evaluation else {},
        paths=ResultPaths(
            output_dir=str(out),
            model=result.model_dir if result else None,
            adapter=result.adapter_dir if result else None,
            checkpoint=result.checkpoint if result else None,
            reference=result.reference_path if result else None,
            samples=evaluation.samples_path if evaluation else None,
            generations=evaluation.generations_path if evaluation else None,
            store=str(pre.store.path) if pre else None,
        ),
        data={**prepared.summary(), "dropped_in_training": result.dropped if result else []},
        precompute=None
        if pre is None
        else {
            "key": pre.key,
            "cached": pre.cached,
            "seconds": pre.seconds,
            "tokens": pre.tokens,
            "tokens_per_second": pre.tokens_per_second,
            "teacher_check": pre.teacher_check.to_dict() if pre.teacher_check else None,
        },
        train=None
        if result is None
        else {
            "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second,
            "total_steps": result.total_steps,
            "resumed_from": result.resumed_from,
            "history": result.history,
        },
        timings=timings,
        spec=spec.to_dict(),
    )
    path = write_result(out / RESULT_FILE, record)
    return JobResult(status, prepared, pre, result, evaluation, timings, str(path))
