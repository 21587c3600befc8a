"""Tests of the evaluate stage (tvkd.evaluate.Evaluator) on tiny real models (CPU): it scores the
saved model folder exactly as the trainer scored the model in memory (the final evaluation used
to run inside training), writes the same samples.json, and refuses reference log-probs of
another run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trainer import EVAL, make_trainer

from tvkd.evaluate import Evaluator
from tvkd.reference import REFERENCE_FILE
from tvkd.samples import write_samples
from tvkd.trainer import Trainer


def evaluator_for(trainer: Trainer, step: int, **kw) -> Evaluator:
    return Evaluator(
        kw.pop("config", trainer.config),
        student=trainer.student,
        teacher=trainer.teacher,
        pairs=trainer.pairs,
        eval_idx=trainer.eval_idx,
        store=trainer.store,
        output_dir=trainer.output_dir,
        step=step,
        **kw,
    )


def train_and_score_in_memory(trainer: Trainer, tmp_path: Path) -> tuple[dict, dict]:
    """Train; just before the model folder is saved, the held-out metrics and samples of the
    model in memory (what the trainer's final evaluation reported before it moved)."""
    in_memory: dict = {}
    save = trainer.save_model

    def evaluate_then_save() -> Path:
        in_memory["metrics"] = trainer.evaluate()
        in_memory["samples"] = write_samples(
            tmp_path / "in-memory-samples.json",
            model=trainer.model,
            tokenizer=trainer.tokenizer,
            train_pairs=trainer.eval_set[: trainer.config.num_samples],
            pairs=trainer.pairs,
            loss_options=trainer.loss_options,
            teacher=trainer.teacher,
            same_tokenizer=bool(trainer.same_tokenizer),
            teacher_max_length=int(trainer.store.fields["max_length"]) if trainer.store else None,
            step=trainer.step,
        )
        return save()

    trainer.save_model = evaluate_then_save  # type: ignore[method-assign]
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed" and result.model_dir
    return in_memory["metrics"], json.loads(in_memory["samples"].read_text())


@pytest.mark.parametrize("lora", [False, True])
def test_evaluator_scores_the_saved_model_as_training_did(
    train_models, arith_store, recording_callbacks, tmp_path, lora
):
    pairs, store = arith_store
    extra = {"lora": True, "lora_r": 4, "learning_rate": 1e-2} if lora else {}
    trainer = make_trainer(train_models, pairs, store, tmp_path / "job", max_steps=3, num_samples=2, **extra)
    metrics, samples = train_and_score_in_memory(trainer, tmp_path)

    cb = recording_callbacks()
    evaluator = evaluator_for(trainer, 3, callbacks=cb)
    evaluator.setup()
    result = evaluator.run()
    evaluator.cleanup()
    assert result.step == 3 and result.eval_pairs == EVAL and result.metrics["pairs"] == EVAL
    assert cb.metrics == [(3, "eval", result.metrics)]
    assert {"evaluate", "samples"} <= set(cb.stages)
    stage = json.loads(Path(result.samples_path).read_text())
    if not lora:
        # The same float32 weights, pairs and π_ref: the same numbers, bit for bit.
        assert result.metrics == metrics
        assert stage == samples
        return
    # LoRA: the stage scores the merged folder (W + BA in one matrix), training the adapter
    # wrapper; equal up to float32 rounding of the merge.
    assert set(result.metrics) == set(metrics)
    for name, value in metrics.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-5), name
    assert [s["index"] for s in stage["samples"]] == [s["index"] for s in samples["samples"]]


def test_evaluator_refuses_reference_logps_of_another_run(train_models, arith_store, tmp_path):
    pairs, store = arith_store
    trainer = make_trainer(train_models, pairs, store, tmp_path / "job", max_steps=1, num_samples=0)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    # Made under float32, asked for under bf16: the π_ref the loss saw is not this one.
    bf16 = trainer.config.__class__.from_dict({**trainer.config.to_dict(), "bf16": True})
    with pytest.raises(ValueError, match="bf16"):
        evaluator_for(trainer, 1, config=bf16).setup()
    (trainer.output_dir / REFERENCE_FILE).unlink()
    with pytest.raises(ValueError, match="no reference log-probs"):
        evaluator_for(trainer, 1).setup()
