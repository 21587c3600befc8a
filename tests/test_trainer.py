"""Tests of tvkd.trainer on tiny real models (CPU): the fused step against the plain path,
resume = uninterrupted, stop requests, cross-tokenizer values, LoRA, and DPO without a teacher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tvkd.alignment import check_alignment
from tvkd.batch import collate, policy_logps
from tvkd.checkpoint import latest_checkpoint, list_checkpoints
from tvkd.config import ConfigError, MethodConfig, PrecomputeConfig, TrainConfig
from tvkd.evaluate import Evaluator, evaluate
from tvkd.losses import tvkd_loss
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.ragged import RaggedFile
from tvkd.trainer import Trainer
from tvkd.values import shaping_from_values

METHOD_FIELDS = {f.name for f in dataclasses.fields(MethodConfig)}
EVAL = 8  # the last 8 pairs are held out


def make_trainer(models, pairs, store, out: Path, *, teacher="teacher", callbacks=None, resume=False, **kw):
    method = {k: kw.pop(k) for k in list(kw) if k in METHOD_FIELDS}
    settings = {"batch_size": 8, "learning_rate": 3e-3, "max_length": 64, "num_samples": 2, **kw}
    config = TrainConfig.from_dict({**settings, "method": method})
    n = len(pairs)
    return Trainer(
        config,
        student=models["student"],
        teacher=models[teacher] if teacher else None,
        pairs=pairs,
        train_idx=range(n - EVAL),
        eval_idx=range(n - EVAL, n),
        store=store,
        output_dir=out,
        callbacks=callbacks,
        resume=resume,
    )


def plain_logps(model, example, side: str) -> torch.Tensor:
    """log π(y_t | s_t) the plain way: full logits of the unpadded row, log-softmax in float64."""
    response = getattr(example, f"{side}_ids")
    ids = torch.tensor(np.concatenate([example.prompt_ids, response]))[None]
    logits = model(input_ids=ids).logits[0].double()
    p = len(example.prompt_ids)
    logp = logits[p - 1 : p - 1 + len(response)].log_softmax(-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def pad64(rows: list, width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.as_tensor(np.array(row), dtype=torch.float64)
    return out


def plain_loss(model, examples, options) -> tuple[torch.Tensor, dict[str, float]]:
    sides = {}
    for side in ("chosen", "rejected"):
        logps = [plain_logps(model, e, side) for e in examples]
        width = max(len(x) for x in logps)
        lengths = torch.tensor([len(x) for x in logps])
        sides[side] = (
            torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in logps]),
            pad64([getattr(e, f"ref_{side}") for e in examples], width),
            pad64([getattr(e, f"{side}_values") for e in examples], width + 1),
            torch.arange(width)[None] < lengths[:, None],
        )
    (pc, rc, vc, mc), (pr, rr, vr, mr) = sides["chosen"], sides["rejected"]
    return tvkd_loss(pc, pr, rc, rr, vc, vr, mc, mr, **options)


def test_step_loss_matches_plain_path(train_models, arith_store, tmp_path):
    pairs, store = arith_store
    trainer = make_trainer(train_models, pairs, store, tmp_path, alpha=0.7, beta=0.5, max_steps=4)
    trainer.setup()
    # The reference file holds the initial student's log-probs, the plain way.
    initial = load_causal_lm(train_models["student"])
    ref = RaggedFile(tmp_path / "reference.safetensors")
    examples = sorted(trainer.train_set + trainer.eval_set, key=lambda e: e.index)
    with torch.no_grad():
        for r in (0, 5, len(examples) - 1):
            for side in ("chosen", "rejected"):
                want = plain_logps(initial, examples[r], side)
                np.testing.assert_allclose(ref.row(side, r), want.numpy(), atol=1e-5)
    # Move the student away from π_ref so that the log-ratios are not zero.
    for step in range(2):
        trainer.train_step(trainer.step_batches(step))
    trainer.step = 2

    # Pairs of different lengths, so padding and the flat scatter are exercised.
    batch_examples = sorted(trainer.train_set, key=lambda e: len(e.chosen_ids) + len(e.prompt_ids))
    batch_examples = batch_examples[:3] + batch_examples[-3:]
    assert (
        len({len(e.chosen_ids) for e in batch_examples} | {len(e.rejected_ids) for e in batch_examples}) > 1
    )
    model = trainer.model
    batch = collate(batch_examples, trainer.pad_id)
    chosen, rejected = policy_logps(model, batch)
    loss, metrics = tvkd_loss(
        chosen,
        rejected,
        *batch.split(batch.ref_logps),
        *batch.split(batch.values),
        *batch.split(batch.response_mask),
        **trainer.loss_options,
    )
    want_loss, want_metrics = plain_loss(model, batch_examples, trainer.loss_options)
    assert abs(loss.item() - want_loss.item()) <= 1e-5
    assert abs(metrics["rewards/margins"]) > 1e-3  # the check is not vacuous
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name

    # Same gradients as the plain path (the fused head's custom backward, through the scatter).
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.autograd.grad(loss, params)
    plain = torch.autograd.grad(want_loss, params)
    for g_fused, g_plain in zip(fused, plain, strict=True):
        torch.testing.assert_close(g_fused, g_plain.to(g_fused.dtype), atol=1e-6, rtol=1e-4)


def test_resume_equals_uninterrupted_and_stop_is_honoured(
    train_models, arith_store, recording_callbacks, tmp_path
):
    pairs, store = arith_store
    # 8 pairs per step over 56 training pairs: 7 steps per epoch, so the run crosses an epoch.
    settings = {"max_steps": 10, "batch_size": 4, "grad_accum": 2, "warmup_ratio": 0.2}
    # Reports every 2 steps and a stop after step 5: the pending step-5 metrics travel in the checkpoint.
    settings |= {"save_every": 3, "keep_checkpoints": 2, "log_every": 2, "num_samples": 0}

    straight_cb = recording_callbacks()
    straight = make_trainer(train_models, pairs, store, tmp_path / "a", callbacks=straight_cb, **settings)
    straight.setup()
    full = straight.train()
    full_eval = straight.evaluate()
    straight.cleanup()
    assert full.status == "completed" and full.steps == 10
    # Saved at 3, 6, 9 and the end; the newest two are kept.
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-000009", "step-000010"]

    # The stop is asked for once step 5 is done: no step 6 runs, a checkpoint is written.
    stop_cb = recording_callbacks(stop_after=5)
    first = make_trainer(train_models, pairs, store, tmp_path / "b", callbacks=stop_cb, **settings)
    first.setup()
    stopped = first.train()
    first.cleanup()
    assert stopped.status == "stopped" and stopped.steps == 5
    assert max(done for stage, done, _ in stop_cb.progress if stage == "train") == 5
    assert sorted(stop_cb.train_metrics()) == [2, 4]
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "step-000005"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (ckpt / name).is_file()
    assert stopped.model_dir is None

    resume_cb = recording_callbacks()
    second = make_trainer(
        train_models, pairs, store, tmp_path / "b", callbacks=resume_cb, resume=True, **settings
    )
    second.setup()
    resumed = second.train()
    resumed_eval = second.evaluate()
    second.cleanup()
    assert resumed.status == "completed" and resumed.resumed_from == 5 and resumed.steps == 10
    assert any("reusing reference" in message for _, message in resume_cb.events)

    a = load_file(Path(full.model_dir) / "model.safetensors")
    b = load_file(Path(resumed.model_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sorted(resume_cb.train_metrics()) == [6, 8, 10]
    straight_metrics = straight_cb.train_metrics()
    for step, metrics in resume_cb.train_metrics().items():
        assert metrics == straight_metrics[step], step
    assert full_eval == resumed_eval and full_eval["pairs"] == EVAL


def test_different_tokenizers_map_values(train_models, arith_store, tmp_path):
    from tvkd.precompute import precompute_values

    pairs, same_store = arith_store
    other = precompute_values(
        train_models["other"], pairs, PrecomputeConfig(max_length=64), store_root=tmp_path / "stores"
    ).store
    trainer = make_trainer(
        train_models, pairs, other, tmp_path / "out", teacher="other", max_steps=2, num_samples=1
    )
    trainer.setup()
    assert trainer.same_tokenizer is False
    teacher_tok = load_tokenizer(train_models["other"])
    differs = 0
    for e in trainer.train_set + trainer.eval_set:
        v = other.pair(e.index)
        for side in ("chosen", "rejected"):
            values = torch.as_tensor(getattr(e, f"{side}_values"), dtype=torch.float64)[None]
            mask = torch.ones(1, len(getattr(e, f"{side}_ids")), dtype=torch.bool)
            teacher_values = getattr(v, f"{side}_values")
            differs += len(teacher_values) != values.shape[1]
            # γ = 1: Σψ on the student's tokens = V(end) − V(prompt end) on the teacher's.
            total = shaping_from_values(values, mask, gamma=1.0).sum().item()
            assert total == pytest.approx(float(teacher_values[-1]) - float(teacher_values[0]), abs=1e-5)
    assert differs > 0, "the two tokenizers should split some responses differently"
    assert teacher_tok.vocab_size != trainer.tokenizer.vocab_size
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed"
    import json

    evaluator = Evaluator(
        trainer.config,
        student=train_models["student"],
        teacher=train_models["other"],
        pairs=pairs,
        eval_idx=trainer.eval_idx,
        store=other,
        output_dir=tmp_path / "out",
        step=result.steps,
    )
    evaluator.setup()
    evaluation = evaluator.run()
    evaluator.cleanup()
    samples = json.loads(Path(evaluation.samples_path).read_text())
    assert samples["teacher_logp_source"] is None and "tokenizers differ" in samples["note"]
    assert samples["samples"][0]["chosen"]["tokens"][0]["teacher_logp"] is None

    # Identical tokenizers: the store's values are used as they are (the identity mapping).
    same = make_trainer(train_models, pairs, same_store, tmp_path / "same", max_steps=1)
    same.setup()
    assert same.same_tokenizer is True
    for e in same.train_set[:5]:
        np.testing.assert_array_equal(e.chosen_values, same_store.pair(e.index).chosen_values)
    same.cleanup()


def test_action_dependent_shaping_with_other_tokenizer_fails_early(train_models, arith_store, tmp_path):
    pairs, store = arith_store
    student, other = load_tokenizer(train_models["student"]), load_tokenizer(train_models["other"])
    for shaping in ("logprob", "logit"):
        with pytest.raises(ConfigError) as info:
            check_alignment(
                MethodConfig(shaping=shaping), pairs, student_tokenizer=student, teacher_tokenizer=other
            )
        assert info.value.field == "shaping" and "shaping" in str(info.value)
    # Same tokenizer, but a store without token stats: also a 'shaping' error, before any weights load.
    trainer = make_trainer(train_models, pairs, store, tmp_path, shaping="logprob", max_steps=1)
    with pytest.raises(ConfigError, match="token_stats"):
        trainer.setup()
    assert not hasattr(trainer, "model")
    # A store computed for other pairs.
    with pytest.raises(ConfigError) as info:
        check_alignment(
            MethodConfig(), pairs[:-1], student_tokenizer=student, teacher_tokenizer=student, store=store
        )
    assert info.value.field == "store"


def test_lora_trains_adapters_only_and_merges(train_models, arith_store, tmp_path):
    from transformers import AutoModelForCausalLM

    pairs, store = arith_store
    trainer = make_trainer(
        train_models, pairs, store, tmp_path, lora=True, lora_r=4, learning_rate=1e-2, max_steps=3
    )
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for step in range(2):
        trainer.train_step(trainer.step_batches(step))
    trainer.step = 2
    for name, p in trainer.model.named_parameters():
        if name in trainable:
            if "lora_B" in name:
                assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed"
    assert set(load_file(Path(result.checkpoint) / "model.safetensors")) == trainable
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = load_file(Path(train_models["student"]) / "model.safetensors")
    state = merged.state_dict()
    assert not any("lora" in k for k in state)
    assert torch.equal(state["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_plain_dpo_needs_no_store(train_models, arith_store, tmp_path):
    pairs, _ = arith_store
    trainer = make_trainer(train_models, pairs, None, tmp_path, teacher=None, alpha=0.0, max_steps=2)
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed" and result.steps == 2
    assert result.metrics["tvkd/shaping_chosen"] == 0.0
    assert result.same_tokenizer is None
    # The teacher is needed as soon as the method uses it.
    with pytest.raises(ConfigError) as info:
        make_trainer(train_models, pairs, None, tmp_path / "x", teacher=None, alpha=0.5, max_steps=1).setup()
    assert info.value.field == "alpha"


def test_evaluate_weights_pairs_not_batches(train_models, arith_store, tmp_path):
    pairs, store = arith_store
    trainer = make_trainer(train_models, pairs, store, tmp_path, max_steps=1)
    trainer.setup()
    trainer.train_step(trainer.step_batches(0))  # so that the log-ratios are not all zero
    examples = trainer.train_set[:8]
    whole = evaluate(trainer.model, [collate(examples, trainer.pad_id)], trainer.loss_options)
    parts = [collate(examples[:3], trainer.pad_id), collate(examples[3:], trainer.pad_id)]
    split = evaluate(trainer.model, parts, trainer.loss_options)
    assert split["pairs"] == whole["pairs"] == 8
    for name, value in whole.items():
        assert split[name] == pytest.approx(value, abs=1e-6), name
    trainer.cleanup()


def test_stop_before_the_first_step_and_bf16(train_models, arith_store, recording_callbacks, tmp_path):
    pairs, store = arith_store
    cb = recording_callbacks(stop_after=0)
    cb.progress.append(("train", 0, 3))  # asks to stop at once: during the reference pass
    trainer = make_trainer(train_models, pairs, store, tmp_path / "stop", callbacks=cb, max_steps=3)
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "stopped" and result.steps == 0 and result.checkpoint is None

    # bf16 autocast: trains, log-probs stay float32, and the reference is made under bf16 too.
    trainer = make_trainer(train_models, pairs, store, tmp_path / "bf16", bf16=True, max_steps=2)
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed"
    assert all(np.isfinite(v) for v in result.metrics.values())
    assert RaggedFile(Path(result.reference_path)).metadata["bf16"] == "True"


@pytest.mark.parametrize("batch_size", [2, 3])
def test_held_out_rewards_are_exactly_zero_before_any_update(train_models, arith_store, tmp_path, batch_size):
    # The policy equals the reference until the first step: the reference log-probs of the held-out
    # pairs must be computed in the batches evaluation uses, or batch-shape noise (~5e-7) makes
    # rewards/margins nonzero and rewards/accuracies (strict chosen > rejected) > 0.
    pairs, _ = arith_store
    config = TrainConfig.from_dict(
        {"batch_size": batch_size, "max_steps": 1, "max_length": 64, "method": {"alpha": 0.0}}
    )
    trainer = Trainer(
        config,
        student=train_models["student"],
        teacher=None,
        pairs=pairs,
        train_idx=[0, 1, 2, 8, 9, 10, 11],
        eval_idx=[3, 4, 5, 6, 7, 12, 13],
        store=None,
        output_dir=tmp_path,
    )
    trainer.setup()
    metrics = trainer.evaluate()
    trainer.cleanup()
    assert metrics["pairs"] == 7
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0
