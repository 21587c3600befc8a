"""The job path of DESIGN.md as stage functions: validate → precompute → train → evaluate.

Each stage is a plain function of a `JobSpec` (and the previous stage's output), so the Celery
worker can run them one by one and record progress between them; `tvkd.run_job` chains them for
the CLI and writes `output_dir/result.json` (`tvkd.artifacts.ResultFile`). What validate
prepared is a `tvkd.prepared.Prepared` (kept in `prepared.json` for the later stages). The reference pass runs
inside `train` (it needs the student the trainer loads) and announces itself through
`Callbacks.on_stage`; `evaluate` scores the saved model folder on the held-out pairs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tvkd import distributed
from tvkd.alignment import check_alignment
from tvkd.callbacks import CallbackList, Callbacks
from tvkd.config import ConfigError, JobSpec, PrecomputeConfig, SFTConfig, TrainConfig, flat_settings
from tvkd.data import DataError, dataset_fingerprint, split_pairs
from tvkd.evaluate import EvalResult, Evaluator
from tvkd.generation import generation_options, held_out_records
from tvkd.pairs import file_error
from tvkd.prepared import Prepared, issue_list, row_loader
from tvkd.sft import SFTTrainer, evaluate_saved
from tvkd.store import ValueStore
from tvkd.teacher_check import teacher_check
from tvkd.trackers import TrackerCallbacks, TrackerSettings, open_trackers
from tvkd.trainer import Trainer, TrainResult
from tvkd.windows import LengthLimit, effective_max_length


def validate(spec: JobSpec, callbacks: Callbacks | None = None) -> Prepared:
    """Load and split the data, load tokenizers (no weights), and check that the job can run.

    Raises ConfigError (a setting), DataError (the data) or ModelError (a model folder) before any
    expensive work.
    """
    from tvkd.models import load_config, load_tokenizer
    from tvkd.precompute import check_teacher_reference
    from tvkd.tokenize import tokenize_pairs

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    cfg = spec.train
    method = cfg.method if isinstance(cfg, TrainConfig) else None
    cb.on_stage("validate", {"dataset": spec.dataset, "student": spec.student, "teacher": spec.teacher})
    if method is not None and method.uses_teacher and not spec.teacher:
        raise ConfigError(
            "teacher",
            f"alpha={method.alpha} with shaping={method.shaping!r} needs a teacher (or set alpha=0)",
        )
    warnings = method.warnings() if method is not None else []
    for w in warnings:
        cb.on_event("warning", w)

    on_error = spec.options.on_error
    load = row_loader(spec)
    pairs, report = load(spec.dataset, on_error=on_error, limit=spec.options.limit)
    if report.dropped:
        cb.on_event(
            "warning",
            f"{report.dropped} bad rows of {report.total_rows} dropped from {spec.dataset}",
            {"issues": issue_list(report)},
        )
    eval_report = None
    if spec.options.eval_dataset:
        eval_pairs, eval_report = load(spec.options.eval_dataset, on_error=on_error, limit=spec.options.limit)
        if eval_report.dropped:
            cb.on_event(
                "warning",
                f"{eval_report.dropped} bad rows dropped from {spec.options.eval_dataset}",
                {"issues": issue_list(eval_report)},
            )
        train_idx = list(range(len(pairs)))
        eval_idx = list(range(len(pairs), len(pairs) + len(eval_pairs)))
        pairs = pairs + eval_pairs
    else:
        _, held_out = split_pairs(pairs, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
        held = {id(p) for p in held_out}  # split_pairs returns the input objects
        train_idx = [i for i, p in enumerate(pairs) if id(p) not in held]
        eval_idx = [i for i, p in enumerate(pairs) if id(p) in held]
    if not train_idx:
        raise (
            DataError(report)
            if report.issues
            else file_error(str(spec.dataset), "no_pairs", "the dataset holds no pairs")
        )

    load_config(spec.student)
    tokenizers = {"student": load_tokenizer(spec.student)}
    same_tokenizer = None
    if method is not None:
        if method.uses_teacher:
            assert spec.teacher is not None
            load_config(spec.teacher)
            tokenizers["teacher"] = load_tokenizer(spec.teacher)
            reference = spec.options.teacher_reference
            if method.q_source == "implicit" and reference:
                load_config(reference)
            check_teacher_reference(precompute_config(spec), reference, tokenizers["teacher"])
        same = check_alignment(
            method,
            pairs,
            student_tokenizer=tokenizers["student"],
            teacher_tokenizer=tokenizers.get("teacher"),
        )
        same_tokenizer = same if "teacher" in tokenizers else None
    limit = length_limit(spec)
    if limit.note():
        cb.on_event("info", str(limit.note()), {"max_length": limit.max_length})
    truncation_mode = getattr(cfg, "truncation_mode", "none")

    # Template round-trip and lengths: every pair through every tokenizer that will see it.
    token_reports = {}
    for name, tok in tokenizers.items():
        if name == "teacher" and same_tokenizer:
            continue  # the same tokenizer sees the same tokens
        _, rep = tokenize_pairs(
            tok, pairs, max_length=limit.max_length, on_error=on_error, truncation_mode=truncation_mode
        )
        token_reports[name] = rep
        if rep.dropped:
            cb.on_event(
                "warning",
                f"{rep.dropped} of {len(pairs)} pairs do not fit the {name} "
                f"(max_length={limit.max_length} or chat template); they will be dropped",
                {"issues": issue_list(rep)},
            )
        if rep.kept == 0:
            raise DataError(rep)
    prepared = Prepared(
        pairs=pairs,
        train_idx=train_idx,
        eval_idx=eval_idx,
        report=report,
        eval_report=eval_report,
        dataset_fingerprint=dataset_fingerprint(pairs),
        same_tokenizer=same_tokenizer,
        token_reports=token_reports,
        warnings=warnings,
        seconds=time.perf_counter() - t0,
    )
    cb.on_event(
        "info",
        f"{len(train_idx)} training and {len(eval_idx)} held-out pairs",
        {"train_pairs": len(train_idx), "eval_pairs": len(eval_idx), "same_tokenizer": same_tokenizer},
    )
    return prepared


def length_limit(spec: JobSpec) -> LengthLimit:
    """The job's effective max_length: min(max_length, the student's and (when the method uses
    it) the teacher's context windows). Reads the models' configs only."""
    method = getattr(spec.train, "method", None)  # an SFT job has none, and no teacher
    teacher = spec.teacher if method is not None and method.uses_teacher else None
    return effective_max_length(spec.train.max_length, {"student": spec.student, "teacher": teacher})


def precompute_config(spec: JobSpec, shard_size: int | None = None) -> PrecomputeConfig:
    """The teacher pass the method needs (its fields are part of the store's content key); the
    teacher tokenizes to the job's effective max_length, as the student does. `shard_size`
    (pairs per store shard, not in the key): PrecomputeConfig's default when None."""
    method = spec.train.method
    sharding = {} if shard_size is None else {"shard_size": shard_size}
    return PrecomputeConfig(
        **sharding,
        q_source=method.q_source,
        value_beta=method.value_beta,
        token_stats=method.shaping in ("logprob", "logit"),
        max_length=length_limit(spec).max_length,
        truncation_mode=spec.train.truncation_mode,
        bf16=spec.options.precompute_bf16,
    )


def precompute(
    spec: JobSpec, prepared: Prepared, callbacks: Callbacks | None = None, *, shard_size: int | None = None
) -> Any:
    """Teacher values for every pair (reused when cached); None when the method needs no teacher.
    Shards other processes wrote for the same key (`tvkd.precompute.precompute_shards`) are kept;
    when they are all there this only writes the manifest. Under torchrun the ranks share the
    shards (each its own, then any no rank holds); the store is the one a single process writes.

    Then the teacher check on the training pairs (`tvkd.teacher_check`): metrics with split
    "teacher" at step 0, an event (a warning when its interval includes 0.5), and
    `result.teacher_check`. Raises `tvkd.precompute.PrecomputeStopped` when `callbacks.should_stop()`.
    """
    from tvkd.precompute import num_shards, part_order, precompute_shards, precompute_values

    cb = callbacks or Callbacks()
    if not spec.uses_teacher:
        what = "supervised fine-tuning" if spec.kind == "sft" else "plain DPO (alpha=0 or shaping='none')"
        cb.on_event("info", f"{what}: no teacher precompute")
        return None
    assert spec.teacher is not None
    cb.on_stage("precompute", {"teacher": spec.teacher, "pairs": len(prepared.pairs)})
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (total - done) if done else None
        cb.on_progress("precompute", done, total, eta)

    config = precompute_config(spec, shard_size)
    ctx = distributed.context()
    if ctx.enabled:  # torchrun: each rank its shards first, then any left (the store is the same)
        precompute_shards(
            spec.teacher, prepared.pairs, config, store_root=spec.store_root, device=spec.device,
            shards=part_order(num_shards(len(prepared.pairs), config), ctx.rank, ctx.world_size),
            progress=progress, should_stop=cb.should_stop, on_error=spec.options.on_error,
            teacher_reference=spec.options.teacher_reference, made_by={"rank": ctx.rank},
        )  # fmt: skip
    result = precompute_values(
        spec.teacher,
        prepared.pairs,
        config,
        store_root=spec.store_root,
        device=spec.device,
        progress=progress,
        should_stop=cb.should_stop,
        on_error=spec.options.on_error,
        teacher_reference=spec.options.teacher_reference,
    )
    result.teacher_check = teacher_check(result.store, prepared.train_idx, spec.train.method)
    cb.on_metrics(0, result.teacher_check.metrics(), "teacher")
    level = "warning" if result.teacher_check.chance else "info"
    cb.on_event(level, result.teacher_check.message(), result.teacher_check.to_dict())
    rate = f" ({result.tokens_per_second:.0f} tokens/s)" if result.tokens else " (from shards on disk)"
    how = "reused cached" if result.cached else f"computed{rate}"
    cb.on_event(
        "info",
        f"teacher values {how}: {result.store.path}",
        {"key": result.key, "cached": result.cached, "path": str(result.store.path)},
    )
    if result.store.missing:
        cb.on_event(
            "warning",
            f"{len(result.store.missing)} pairs do not fit the teacher; they will be dropped",
            {"issues": issue_list(result.report)},
        )
    return result


def train(
    spec: JobSpec,
    prepared: Prepared,
    store: ValueStore | None,
    callbacks: Callbacks | None = None,
    resume: bool = True,
    trackers: TrackerSettings | None = None,
) -> TrainResult:
    """Reference pass, training (with checkpoints) and the final model folder; for an "sft" job
    the `tvkd.sft.SFTTrainer` recipe (no reference, no store).

    The job's `report_to` trackers (tvkd/trackers.py) get the metrics, the settings and the final
    model's path; `trackers` says where their runs go (default: `TrackerSettings.for_output`)."""
    tracker, callbacks = open_job_trackers(spec, trackers, callbacks)
    result: TrainResult | None = None
    try:
        result = run_training(spec, prepared, store, callbacks, resume)
        return result
    finally:
        if tracker is not None:
            tracker.close(result.model_dir if result else None, result.status if result else "failed")


def run_training(
    spec: JobSpec, prepared: Prepared, store: ValueStore | None, callbacks: Callbacks | None, resume: bool
) -> TrainResult:
    """`train` without opening the job's trackers (the caller holds them: `tvkd.run_job`)."""
    if isinstance(spec.train, SFTConfig):
        return _run_recipe(
            SFTTrainer(
                spec.train,
                student=spec.student,
                examples=prepared.pairs,
                train_idx=prepared.train_idx,
                eval_idx=prepared.eval_idx,
                output_dir=spec.output_dir,
                device=spec.device,
                callbacks=callbacks,
                resume=resume,
            )
        )
    trainer = Trainer(
        spec.train,
        student=spec.student,
        teacher=spec.teacher if store is not None else None,
        pairs=prepared.pairs,
        train_idx=prepared.train_idx,
        eval_idx=prepared.eval_idx,
        store=store,
        output_dir=spec.output_dir,
        device=spec.device,
        callbacks=callbacks,
        resume=resume,
    )
    return _run_recipe(trainer)


def _run_recipe(trainer: Trainer) -> TrainResult:
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


def open_job_trackers(
    spec: JobSpec,
    trackers: TrackerSettings | None,
    callbacks: Callbacks | None,
    *,
    resume_at: int | None = None,
) -> tuple[TrackerCallbacks | None, Callbacks | None]:
    """The job's `report_to` trackers, added to `callbacks`; with `resume_at`, their runs are
    continued from that step at once (the evaluate stage reports into the train stage's runs).
    Under torchrun only rank 0 opens them."""
    if not distributed.context().is_main:
        return None, callbacks
    tracker = open_trackers(
        spec.options.report_to,
        trackers or TrackerSettings.for_output(spec.output_dir),
        flat_settings(spec.settings()),
    )
    if tracker is None:
        return None, callbacks
    if resume_at is not None:
        tracker.on_stage("train", {"start_step": resume_at})
    return tracker, CallbackList([callbacks, tracker])


def evaluate(
    spec: JobSpec,
    prepared: Prepared,
    store: ValueStore | None,
    callbacks: Callbacks | None = None,
    *,
    step: int,
    trackers: TrackerSettings | None = None,
) -> EvalResult:
    """Held-out metrics and samples.json of the model folder `train` saved at step `step`
    (`store`: the one training used, None without a teacher), and with `gen_prompts` the
    generation evaluation (generations.json); for an "sft" job the held-out mean NLL
    (`tvkd.sft.evaluate_saved`; no generation evaluation). The job's trackers get the held-out
    metrics in the run the train stage started, which ends here with the model folder's path."""
    tracker, callbacks = open_job_trackers(spec, trackers, callbacks, resume_at=step)
    result: EvalResult | None = None
    try:
        result = run_evaluation(spec, prepared, store, callbacks, step=step)
        return result
    finally:
        if tracker is not None:
            model_dir = str(Path(spec.output_dir) / "model")
            tracker.close(model_dir if result else None, "completed" if result else "failed")


def run_evaluation(
    spec: JobSpec, prepared: Prepared, store: ValueStore | None, callbacks: Callbacks | None, *, step: int
) -> EvalResult:
    """`evaluate` without opening the job's trackers (the caller holds them: `tvkd.run_job`)."""
    if isinstance(spec.train, SFTConfig):
        return evaluate_saved(
            spec.train,
            student=spec.student,
            examples=prepared.pairs,
            eval_idx=prepared.eval_idx,
            output_dir=spec.output_dir,
            step=step,
            device=spec.device,
            callbacks=callbacks,
        )
    generation = generation_options(spec)
    evaluator = Evaluator(
        spec.train,
        student=spec.student,
        teacher=spec.teacher if store is not None else None,
        pairs=prepared.pairs,
        eval_idx=prepared.eval_idx,
        store=store,
        output_dir=spec.output_dir,
        step=step,
        device=spec.device,
        callbacks=callbacks,
        generation=generation,
        records=held_out_records(spec, prepared.pairs, prepared.eval_idx) if generation.enabled else None,
    )
    try:
        evaluator.setup()
        return evaluator.run()
    finally:
        evaluator.cleanup()
