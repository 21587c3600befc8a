"""The work of each stage task, on top of tvkd.pipeline: one runner per stage of the table in
service/statemachine.py (`RUNNERS` is built from it). Each runner returns an `Outcome`;
worker.tasks turns it into the job's next state (advance, finish, hand back).

- validate: `pipeline.validate` (rows, tokenizers, template round-trip); its events name bad rows.
- precompute: the teacher pass into the shared value store under `values/` (reused by key; two
  jobs asking for one key at once compute it once: the store's file lock makes the second wait
  and then find it complete). The Precompute row (worker/precompute_rows.py) is upserted by key
  and records which job computed it; the other job gets a "reused" event naming that job. A
  store of several shards is shared with K-1 shard tasks on the precompute queue (worker/fanout.py).
- train: `pipeline.train`, i.e. the Trainer's setup (the reference pass: π_ref log-probs,
  reused on resume), training with checkpoints, and the model folder. Always `resume=True`: a
  re-run after a crash or a hand-back continues from the newest checkpoint. Out-of-memory halves
  batch_size and doubles grad_accum (same effective batch, same data order) and retries from
  the last checkpoint, a few times. A job with num_processes N > 1 trains in N ranks under
  torchrun, the worker relaying rank 0's progress (worker/torchrun.py, worker/rank_train.py).
- evaluate: `pipeline.evaluate` loads the saved model folder (on the `train` queue: it needs the
  model on the device) and writes the held-out metrics (reported with split "eval"), the
  per-token samples and, with `gen_prompts`, the answers before and after training
  (generations.json; gen/* metrics at step 0 and at the last step); then result.json, the
  artifacts and the job's result. Out-of-memory retries with a smaller batch, as in train.

Every stage loads the spec the job stored at submit (`job.spec`, validated then; its names are
resolved again under this worker's roots). Validate writes what it prepared (`prepared.json` in
the job's folder: the split of the kept pairs and their fingerprint); later stages read the data
again (they need the pairs) but do not re-check, re-split or re-tokenize it, and a dataset whose
fingerprint changed since validate fails the job instead of training on other data than was
checked.

What every runner shares (the StageContext, `prepare`, the value store, the artifact rows, the
folders' layout) is in worker/context.py; the out-of-memory retry in worker/oom.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.statemachine import STAGES
from tvkd import pipeline
from tvkd.artifacts import RESULT_FILE, ResultFile, ResultPaths, read_samples, write_result
from tvkd.config import flat_settings
from tvkd.evaluate import EvalResult
from tvkd.models import ModelError
from tvkd.prepared import PREPARED_FILE, write_prepared
from tvkd.store import ValueStore
from worker import fanout, precompute_rows
from worker.context import (
    VALUES_DIR,
    Outcome,
    StageContext,
    output_dir,
    prepare,
    record_artifacts,
    value_store,
    with_batch,
)
from worker.oom import retry_on_oom, smaller_batch_recorder

log = logging.getLogger("tvkd.worker")


# --------------------------------------------------------------------------------------------
# validate


def run_validate(ctx: StageContext) -> Outcome:
    spec = ctx.spec
    prepared = pipeline.validate(spec, ctx.reporter)
    if ctx.flags.requested:
        return Outcome("stopped", message="stopped after validation")
    uses_teacher = spec.uses_teacher
    if not uses_teacher:
        what = "supervised fine-tuning" if spec.kind == "sft" else "plain DPO (alpha=0 or shaping='none')"
        ctx.reporter.event("info", f"{what}: no teacher precompute")
    write_prepared(Path(spec.output_dir) / PREPARED_FILE, prepared)
    summary = prepared.summary()
    return Outcome(
        "advance",
        None if uses_teacher else "train",  # None: the next stage of the job kind's path
        message="validation passed",
        result={
            "validate": {
                "pairs": summary["pairs"],
                "train_pairs": summary["train_pairs"],
                "eval_pairs": summary["eval_pairs"],
                "dataset_fingerprint": summary["dataset_fingerprint"],
                "same_tokenizer": summary["same_tokenizer"],
                "dropped_rows": summary["report"]["dropped"],
                "warnings": summary["warnings"],
            }
        },
    )


# --------------------------------------------------------------------------------------------
# precompute


def run_precompute(ctx: StageContext) -> Outcome:
    from tvkd.precompute import PrecomputeStopped, precompute_key

    spec = ctx.spec
    prepared = prepare(ctx)
    assert spec.teacher is not None  # validate sends jobs without a teacher to "train"
    shard_size = ctx.settings.precompute_shard_size
    config = pipeline.precompute_config(spec, shard_size)
    key, fields = precompute_key(
        spec.teacher,
        prepared.pairs,
        config,
        teacher_reference=spec.options.teacher_reference,  # part of the key with q_source=implicit
    )
    rel = f"{VALUES_DIR}/{key}"
    precompute_rows.started(ctx.factory, key, teacher=ctx.job.teacher, path=rel, fields=fields)
    ctx.record(precompute_key=key)
    parts = fanout.parts_for(ctx.settings, len(prepared.pairs))
    shared = None
    t0 = time.perf_counter()
    try:
        if parts > 1 and ValueStore.find(spec.store_root, key) is None:
            shared = fanout.run_parts(ctx, prepared, config, parts)  # every shard on disk after it
        result = pipeline.precompute(spec, prepared, ctx.reporter, shard_size=shard_size)  # the merge
    except PrecomputeStopped:
        return Outcome("stopped", message="stopped during the teacher precompute (finished shards are kept)")
    except Exception:
        if ValueStore.find(spec.store_root, key) is None:
            precompute_rows.failed(ctx.factory, key)
        raise
    store = result.store
    split: dict[str, Any] = {}
    if shared is not None and not result.cached:  # the teacher ran in this job's `parts` tasks
        result.tokens, result.seconds = int(store.manifest["teacher_tokens"]), time.perf_counter() - t0
        split = {"parts": parts, "shards_by_worker": fanout.shards_by_worker(store.manifest)}
    if result.cached:
        computed_by = precompute_rows.wait_for_recorder(ctx.factory, key, store)
    else:
        precompute_rows.computed(ctx.factory, key, store, job_id=ctx.job.id, tokens=result.tokens)
        computed_by = ctx.job.id
    if result.cached:
        by = f"job {computed_by}" if computed_by and computed_by != ctx.job.id else "an earlier run"
        message = f"teacher values reused from the cache (key {key[:12]}, computed by {by})"
    else:
        tasks = f" in {parts} tasks ({len(split['shards_by_worker'])} workers)" if split else ""
        message = (
            f"teacher values computed by this job{tasks} (key {key[:12]}): {store.num_pairs} pairs, "
            f"{result.tokens} teacher tokens in {result.seconds:.1f}s"
        )
    data = {"key": key, "cached": result.cached, "computed_by": computed_by, "waited_seconds": result.waited}
    data.update(split)
    ctx.reporter.event("info", message, data)
    return Outcome(
        "advance",
        "train",
        message="teacher values ready",
        result={
            "precompute": {
                **data,
                "path": rel,
                "seconds": result.seconds,
                "tokens": result.tokens,
                "teacher_check": result.teacher_check.to_dict() if result.teacher_check else None,
            }
        },
        job_values={"precompute_key": key},
    )


# --------------------------------------------------------------------------------------------
# train (the reference pass, then training)


def run_train(ctx: StageContext) -> Outcome:
    spec = ctx.spec
    ctx.reporter.checkpoint_every = spec.train.save_every
    prepared = prepare(ctx)
    store = value_store(ctx, prepared)

    def attempt(batch_size: int, grad_accum: int) -> Any:
        if spec.train.num_processes > 1:  # N ranks under torchrun, relayed (worker/torchrun.py)
            from worker.torchrun import train_under_torchrun

            return train_under_torchrun(ctx, with_batch(spec, batch_size, grad_accum), prepared, store)
        return pipeline.train(
            with_batch(spec, batch_size, grad_accum),
            prepared,
            store,
            ctx.reporter,
            resume=True,
            trackers=ctx.settings.tracker_settings(ctx.job.id),
        )

    on_retry = smaller_batch_recorder(ctx)
    result = retry_on_oom(attempt, spec.train.batch_size, spec.train.grad_accum, on_retry=on_retry)
    checkpoint = ctx.rel(result.checkpoint)
    if result.status == "stopped":
        return Outcome(
            "stopped",
            message=f"stopped at step {result.steps} of {result.total_steps}",
            data={"step": result.steps, "checkpoint": checkpoint},
        )
    record_artifacts(
        ctx,
        {
            "model": result.model_dir,
            "adapter": result.adapter_dir,
            "reference": result.reference_path,
        },
    )
    return Outcome(
        "advance",
        "evaluate",
        message=f"trained {result.steps} steps",
        result={
            "train": {
                "steps": result.steps,
                "total_steps": result.total_steps,
                "resumed_from": result.resumed_from,
                "metrics": result.metrics,
                "train_pairs": result.train_pairs,
                "eval_pairs": result.eval_pairs,
                "dropped_pairs": len(result.dropped),
                "seconds": result.seconds,
                "tokens_per_second": result.tokens_per_second,
                "checkpoint": checkpoint,
                "model": ctx.rel(result.model_dir),
                "reference": ctx.rel(result.reference_path),
                "adapter": ctx.rel(result.adapter_dir),
            }
        },
    )


# --------------------------------------------------------------------------------------------
# evaluate


def run_evaluate(ctx: StageContext) -> Outcome:
    from tvkd.models import safetensors_param_count

    spec = ctx.spec
    out = output_dir(ctx.settings, ctx.job)
    previous = ctx.job.result or {}
    train = previous.get("train") or {}
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{ctx.rel(model_dir)}: the train stage left no model folder (config.json missing)")
    parameters = safetensors_param_count(model_dir)
    prepared = prepare(ctx)
    store = value_store(ctx, prepared)
    steps = int(train.get("steps") or 0)

    def attempt(batch_size: int, grad_accum: int) -> EvalResult:
        return pipeline.evaluate(
            with_batch(spec, batch_size, grad_accum),
            prepared,
            store,
            ctx.reporter,
            step=steps,
            trackers=ctx.settings.tracker_settings(ctx.job.id),
        )

    on_retry = smaller_batch_recorder(ctx)
    evaluation = retry_on_oom(attempt, spec.train.batch_size, spec.train.grad_accum, on_retry=on_retry)
    samples = Path(evaluation.samples_path) if evaluation.samples_path else None
    sample_count = len(read_samples(samples).samples) if samples else 0
    result = {
        "model": ctx.rel(model_dir),
        "samples": ctx.rel(samples),
        "sample_count": sample_count,
        "parameters": parameters,
        "steps": train.get("steps"),
        "metrics": train.get("metrics", {}),
        "eval_metrics": evaluation.metrics,
        "evaluate": {
            "eval_pairs": evaluation.eval_pairs,
            "dropped_pairs": len(evaluation.dropped),
            "seconds": evaluation.seconds,
            "generations": ctx.rel(evaluation.generations_path),
            "before_metrics": evaluation.before_metrics,  # gen/* of the untrained student
        },
    }
    record = ResultFile(
        status="completed",
        steps=train.get("steps") or 0,
        metrics=result["metrics"],
        eval_metrics=result["eval_metrics"],
        paths=ResultPaths(
            output_dir=ctx.rel(out),
            model=result["model"],
            adapter=train.get("adapter"),
            checkpoint=train.get("checkpoint"),
            reference=train.get("reference"),
            samples=result["samples"],
            generations=ctx.rel(evaluation.generations_path),
            store=(previous.get("precompute") or {}).get("path"),
        ),
        data=previous.get("validate"),
        precompute=previous.get("precompute"),
        train=train,
        spec={
            "teacher": ctx.job.teacher,
            "student": ctx.job.student,
            "dataset": ctx.job.dataset,
            **_api_settings(ctx.job.spec),
        },
        job_id=ctx.job.id,
        parameters=parameters,
        sample_count=sample_count,
    )
    result_path = write_result(out / RESULT_FILE, record)
    record_artifacts(
        ctx,
        {
            "model": model_dir,
            "samples": samples,
            "generations": evaluation.generations_path,
            "reference": out / "reference.safetensors",
            "adapter": out / "adapter",
            "result": result_path,
        },
    )
    ctx.reporter.on_progress("evaluate", 1, 1, 0.0)
    eval_metrics = result["eval_metrics"] or {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items() if isinstance(v, float))
    return Outcome(
        "succeeded",
        message=f"succeeded: model at {result['model']}" + (f"; held-out {summary}" if summary else ""),
        result=result,
    )


def _api_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The stored settings as the API shows them: alpha and beta, then the flat rest."""
    flat = flat_settings(spec)
    alpha, beta = flat.pop("alpha", None), flat.pop("beta", None)
    return {"kind": spec.get("kind") or "tvkd", "alpha": alpha, "beta": beta, "hyperparameters": flat}


# Stage → its runner, as the stage table names it (a stage without its function fails here).
RUNNERS: dict[str, Callable[[StageContext], Outcome]] = {
    name: globals()[stage.runner] for name, stage in STAGES.items()
}
