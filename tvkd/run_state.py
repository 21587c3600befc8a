"""A training run's bookkeeping beyond its weights: what a checkpoint's `state.json` carries, the
mean a metrics report gives, the guard against too many skipped steps, and the `TrainResult`.

`trainer` below is a `tvkd.trainer.Trainer` (or `tvkd.sft.SFTTrainer`): these are its
bookkeeping, kept here so that the trainer module holds the recipe (setup, step, loop).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from tvkd import checkpoint as ckpt_io
from tvkd import dcp
from tvkd.modeling import add_lora
from tvkd.modeling import set_activation_checkpointing as set_checkpointing
from tvkd.models import load_causal_lm
from tvkd.numerics import NonFiniteError
from tvkd.stage_results import TrainResult


def checkpoint_state(trainer: Any) -> dict[str, Any]:
    """`state.json` of a checkpoint at `trainer.step`: the step and its place in the epoch, the
    config, the unreported metric window (so that a resumed run reports exactly what the
    uninterrupted one would have), tokens seen and the skipped-step counts."""
    epoch, position = divmod(trainer.step, trainer.steps_per_epoch)
    return {
        "step": trainer.step,
        "epoch": epoch,
        "position": position,
        "total_steps": trainer.total_steps,
        "config": trainer.config.to_dict(),
        "metrics": trainer.last_metrics,
        "tokens_seen": trainer.tokens_seen,
        "window": trainer.window,
        "skipped_steps": trainer.skipped_steps,
        "skipped_in_a_row": trainer.skipped_in_a_row,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def restore_state(trainer: Any, state: dict[str, Any]) -> None:
    """Set the trainer's step, window, tokens seen and skipped-step counts from `state`."""
    trainer.step = int(state["step"])
    trainer.window, trainer.tokens_seen = list(state["window"]), int(state["tokens_seen"])
    # .get: checkpoints written before the counts were kept have none.
    trainer.skipped_steps = int(state.get("skipped_steps", 0))
    trainer.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))


def window_mean(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of the steps' metrics since the last report; lr and epoch as of the last step.

    A metric absent from some steps (tvkd/shaping_accuracy) is the mean of those that have it;
    only finite values are averaged (a skipped step's NaN loss is not a measurement; the events
    name those steps): a metric with no finite value in the window is left out."""
    metrics = {}
    for k in dict.fromkeys(k for m in window for k in m):
        finite = [m[k] for m in window if k in m and math.isfinite(m[k])]
        if finite:
            metrics[k] = sum(finite) / len(finite)
    metrics["lr"], metrics["epoch"] = window[-1]["lr"], window[-1]["epoch"]
    return metrics


def skipped_error(trainer: Any) -> NonFiniteError | None:
    """NonFiniteError (code nonfinite_gradients) once too many steps were skipped for a
    non-finite gradient norm: `max_skipped_steps` in a row, or more than
    `max_skipped_fraction` of the run's steps (at least one is tolerated); else None. A run that
    learned nothing must not end `completed`."""
    cfg, row, total = trainer.config, trainer.skipped_in_a_row, trainer.skipped_steps
    in_a_row = row >= cfg.max_skipped_steps
    too_many = total > max(1.0, cfg.max_skipped_fraction * trainer.total_steps)
    if not (in_a_row or too_many):
        return None
    why = (
        f"{row} steps in a row (max_skipped_steps={cfg.max_skipped_steps})"
        if in_a_row
        else f"{total} of {trainer.total_steps} steps (max_skipped_fraction={cfg.max_skipped_fraction})"
    )
    return NonFiniteError(
        "nonfinite_gradients",
        f"training stopped at step {trainer.step}: the gradient norm was not finite (NaN/Inf) in "
        f"{why}; those steps were skipped. Check the data, the teacher values and the "
        "learning rate (or try without bf16)",
    )


def train_result(
    trainer: Any, status: str, seconds: float, tps: float, model_dir: Path | None
) -> TrainResult:
    """The `TrainResult` of the run as it stands (`model_dir` None unless completed)."""

    def text(path: Path | None) -> str | None:
        return str(path) if path else None

    lora = model_dir and trainer.config.lora
    return TrainResult(
        status=status,
        steps=trainer.step,
        total_steps=trainer.total_steps,
        metrics=trainer.last_metrics,
        history=trainer.history,
        output_dir=str(trainer.output_dir),
        model_dir=text(model_dir),
        adapter_dir=text(trainer.output_dir / "adapter" if lora else None),
        checkpoint=text(trainer.last_checkpoint),
        reference_path=text(trainer.reference_path),
        train_pairs=len(trainer.train_set),
        eval_pairs=len(trainer.eval_set),
        dropped=trainer.dropped,
        same_tokenizer=trainer.same_tokenizer,
        resumed_from=trainer.resumed_from,
        seconds=seconds,
        tokens_per_second=tps,
    )


def restore_latest(trainer: Any) -> None:
    """Resume `trainer` from the newest checkpoint of its output folder (either format, any
    world size: `tvkd.dcp.restore_latest`), with an event saying so or that there is none."""
    found = dcp.restore_latest(
        trainer.output_dir,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        device=trainer.device,
        config=trainer.config.to_dict(),
    )
    cb = trainer.cb
    if found is None:
        cb.on_event("info", f"no checkpoint in {trainer.output_dir}: starting from step 0")
        return
    ckpt, state, changed = found
    restore_state(trainer, state)
    trainer.resumed_from, trainer.last_checkpoint = trainer.step, ckpt
    if changed:
        cb.on_event(
            "warning",
            f"resuming with changed settings {changed}: the remaining batches "
            "and schedule may differ from the original run",
            {"changed": changed},
        )
    cb.on_event("info", f"resumed from {ckpt} at step {trainer.step}", {"step": trainer.step})


def save_checkpoint(trainer: Any) -> Path:
    """checkpoints/step-NNNNNN/ of `trainer.step` (`tvkd.dcp.save`: one-process format, or DCP
    shards under torchrun); the newest `keep_checkpoints` kept. Returns its folder."""
    final = ckpt_io.checkpoint_path(trainer.output_dir, trainer.step)
    if trainer.last_checkpoint == final and final.is_dir():
        return final  # e.g. save_every landed on the last step
    trainer.last_checkpoint = dcp.save(
        trainer.output_dir,
        trainer.step,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        state=checkpoint_state(trainer),
        keep=trainer.config.keep_checkpoints,
    )
    trainer.cb.on_checkpoint(trainer.step, str(trainer.last_checkpoint))
    return trainer.last_checkpoint


def save_model(trainer: Any) -> Path:
    """output_dir/model: a plain HF folder (safetensors + tokenizer), LoRA merged into it, written
    by rank 0 (`tvkd.dcp.save_model`: FSDP shards are gathered into a fresh student first)."""
    cfg = trainer.config
    trainer.cb.on_stage("save", {"lora": cfg.lora})
    if cfg.gradient_checkpointing:
        set_checkpointing(trainer.model, False)

    def rebuild() -> Any:
        model = load_causal_lm(trainer.student, dtype=torch.float32, device="cpu")
        return add_lora(model, cfg) if cfg.lora else model

    trainer.model, out = dcp.save_model(
        trainer.par, trainer.model, trainer.tokenizer, trainer.output_dir, lora=cfg.lora, rebuild=rebuild
    )
    return out
