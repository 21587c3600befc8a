"""Supervised fine-tuning (tvkd.sft, tvkd.completions, `tvkd sft`) on tiny real models (CPU): the
loss against a float64 reference, exact resume, LoRA + bf16, the two row forms and their bad
rows, the job kinds of JobSpec, and the CLI end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tvkd.artifacts import read_result
from tvkd.completions import COMPLETION_LAYOUT, load_completions
from tvkd.config import ConfigError, JobSpec, SFTConfig, TrainConfig
from tvkd.data import DataError, load_pairs
from tvkd.models import load_causal_lm
from tvkd.sft import SFTTrainer, collate_rows, completion_logps, evaluate_saved

EVAL = 8


def make_sft(models, examples, out: Path, *, callbacks=None, resume=False, **kw) -> SFTTrainer:
    config = SFTConfig.from_dict({"batch_size": 8, "learning_rate": 3e-3, "max_length": 64, **kw})
    n = len(examples)
    return SFTTrainer(
        config,
        student=models["student"],
        examples=examples,
        train_idx=range(n - EVAL),
        eval_idx=range(n - EVAL, n),
        output_dir=out,
        callbacks=callbacks,
        resume=resume,
    )


def reference_nll(model, rows) -> tuple[torch.Tensor, int]:
    """Σ −log π(y_t | s_t) over the completion tokens of `rows`, the plain way: a float64 copy of
    the model, full logits of each unpadded row, float64 log-softmax."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for r in rows:
        ids = torch.tensor(np.concatenate([r.prompt_ids, r.completion_ids]))[None]
        logits = model(input_ids=ids).logits[0].double()
        p, t = len(r.prompt_ids), len(r.completion_ids)
        logp = logits[p - 1 : p - 1 + t].log_softmax(-1)
        total = total - logp.gather(-1, torch.tensor(r.completion_ids)[:, None]).sum()
        count += t
    return total, count


@pytest.fixture(scope="module")
def sft_examples(arith_data):
    examples, report = load_completions(arith_data)
    assert report.kept == len(examples) == 64
    return examples


def test_loss_is_the_token_mean_nll_of_a_float64_reference(train_models, sft_examples, tmp_path):
    # Micro-batches of 3 and 5 rows (grad_accum 2): the step's loss weighs every completion token
    # alike, not each micro-batch; the rows' completions differ in length (1 to 6 tokens).
    trainer = make_sft(train_models, sft_examples, tmp_path, batch_size=5, grad_accum=2, max_steps=1)
    trainer.setup()
    rows = trainer.train_set[:8]
    micro = [rows[:3], rows[3:]]
    assert len({len(r.completion_ids) for r in rows}) > 1

    reference = copy.deepcopy(trainer.model).double()
    total, count = reference_nll(reference, rows)
    want = total / count
    want.backward()
    want_grads = {n: p.grad for n, p in reference.named_parameters()}

    # The fused path (chunked head, float32 log-softmax) over the same micro-batches.
    got = (
        sum(-completion_logps(trainer.model, collate_rows(mb, trainer.pad_id)).sum() for mb in micro) / count
    )
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-5)
    got.backward()
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name].float(), atol=1e-6, rtol=1e-4, msg=name)
    trainer.optimizer.zero_grad(set_to_none=True)

    # train_step reports that loss (before its update) and the step's token count.
    metrics = trainer.train_step(micro)
    assert metrics["loss"] == pytest.approx(float(want.detach()), abs=1e-5)
    assert metrics["num_tokens"] == count
    # Held-out mean NLL against the reference too (after the update).
    reference = copy.deepcopy(trainer.model).double()
    total, count = reference_nll(reference, trainer.eval_set)
    loss, n = trainer.mean_nll(trainer.eval_set)
    assert n == count and loss == pytest.approx(float(total / count), abs=1e-5)
    trainer.cleanup()


def test_resume_equals_uninterrupted_and_it_learns(train_models, sft_examples, recording_callbacks, tmp_path):
    settings = {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "log_every": 2}
    straight_cb = recording_callbacks()
    straight = make_sft(train_models, sft_examples, tmp_path / "a", callbacks=straight_cb, **settings)
    straight.setup()
    before, _ = straight.mean_nll(straight.eval_set)
    full = straight.train()
    full_eval = straight.evaluate()
    straight.cleanup()
    assert full.status == "completed" and full.steps == 6
    print("held-out NLL", before, full_eval["loss"])
    assert full_eval["loss"] < before - 0.5  # the held-out completions became likelier
    assert full.reference_path is None

    # The evaluate stage scores the saved folder as training scored the model in memory.
    stage_cb = recording_callbacks()
    evaluation = evaluate_saved(
        straight.config,
        student=train_models["student"],
        examples=sft_examples,
        eval_idx=straight.eval_idx,
        output_dir=tmp_path / "a",
        step=6,
        callbacks=stage_cb,
    )
    assert evaluation.metrics == full_eval and evaluation.samples_path is None
    assert stage_cb.metrics == [(6, "eval", full_eval)]

    stop_cb = recording_callbacks(stop_after=3)
    first = make_sft(train_models, sft_examples, tmp_path / "b", callbacks=stop_cb, **settings)
    first.setup()
    stopped = first.train()
    first.cleanup()
    assert stopped.status == "stopped" and stopped.steps == 3 and stopped.model_dir is None

    resume_cb = recording_callbacks()
    second = make_sft(
        train_models, sft_examples, tmp_path / "b", callbacks=resume_cb, resume=True, **settings
    )
    second.setup()
    resumed = second.train()
    resumed_eval = second.evaluate()
    second.cleanup()
    assert resumed.status == "completed" and resumed.resumed_from == 3
    a = load_file(Path(full.model_dir) / "model.safetensors")
    b = load_file(Path(resumed.model_dir) / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight_metrics = straight_cb.train_metrics()
    assert sorted(resume_cb.train_metrics()) == [4, 6]  # step 3's metrics travelled in the checkpoint
    for step, metrics in resume_cb.train_metrics().items():
        assert metrics == straight_metrics[step], step
    assert full_eval == resumed_eval


def test_lora_and_bf16(train_models, sft_examples, tmp_path):
    trainer = make_sft(train_models, sft_examples, tmp_path, lora=True, lora_r=4, bf16=True, max_steps=2)
    trainer.setup()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed" and np.isfinite(result.metrics["loss"])
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()
    merged = load_causal_lm(result.model_dir)
    base = load_file(Path(train_models["student"]) / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base[q])


def test_the_two_row_forms_and_their_bad_rows(arith_data, tmp_path):
    # Preference rows: the chosen response is the completion.
    pairs, _ = load_pairs(arith_data)
    examples, report = load_completions(arith_data)
    assert [e.chosen for e in examples] == [p.chosen for p in pairs]
    assert all(e.rejected == e.chosen for e in examples) and "chosen" in report.layout_reason

    rows = [
        {"prompt": "Q: 1+1=", "completion": " 2"},
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "4"}],
        },
        {"prompt": "Q: 3+3=", "completion": "   "},
        {"prompt": 7, "completion": " 8"},
        {"prompt": "Q: 5+5="},
        {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]},
    ]
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as info:
        load_completions(path)
    found = {(i.row, i.field, i.code) for i in info.value.report.issues}
    assert found == {
        (2, "completion", "empty_response"),
        (3, "prompt", "bad_type"),
        (4, "completion", "missing_field"),
        (5, "completion", "template"),
    }
    examples, report = load_completions(path, on_error="drop")
    assert report.layout == COMPLETION_LAYOUT and (report.kept, report.dropped) == (2, 4)
    assert (examples[0].prompt, examples[0].chosen) == ("Q: 1+1=", " 2")
    assert examples[1].prompt_messages == ({"role": "user", "content": "2+2?"},) and examples[1].chosen == "4"


def test_sft_config_has_every_training_setting_but_the_excluded():
    # The trainer's machinery reads TrainConfig's settings from the SFTConfig too: a setting
    # added to TrainConfig must be added to SFTConfig or excluded there on purpose.
    from tvkd.config import SFT_EXCLUDED, config_fields

    train = {f.name: f for f in config_fields(TrainConfig)}
    sft = {f.name: f for f in config_fields(SFTConfig)}
    assert set(sft) == set(train) - set(SFT_EXCLUDED)
    for name, f in sft.items():
        assert (f.type, f.bounds, f.choices) == (train[name].type, train[name].bounds, train[name].choices)


def test_job_kinds_check_their_settings():
    base = {"teacher": None, "student": "s", "dataset": "d", "output_dir": "o", "store_root": "r"}
    spec = JobSpec.from_dict({**base, "kind": "sft", "train": {"learning_rate": 1e-4}})
    assert isinstance(spec.train, SFTConfig) and not spec.uses_teacher
    assert spec.settings()["kind"] == "sft"
    assert JobSpec.from_dict({**base, **spec.settings()}).train == spec.train
    with pytest.raises(ConfigError) as info:  # a method setting is not an SFT setting
        JobSpec.from_dict({**base, "kind": "sft", "train": {"alpha": 0.5}})
    assert info.value.field == "alpha"
    with pytest.raises(ConfigError) as info:
        JobSpec(**base, kind="dpo", train=TrainConfig.from_dict({"alpha": 0.7}))
    assert info.value.field == "alpha"
    assert not JobSpec(**base, kind="dpo", train=TrainConfig.from_dict({"alpha": 0.0})).uses_teacher
    with pytest.raises(ConfigError) as info:
        JobSpec(**base, kind="sft", train=TrainConfig())
    assert info.value.field == "kind"
    with pytest.raises(ConfigError) as info:
        JobSpec(**{**base, "teacher": "t"}, kind="sft", train=SFTConfig())
    assert info.value.field == "teacher"
    with pytest.raises(ConfigError) as info:
        JobSpec(**base, kind="ppo", train=TrainConfig())
    assert info.value.field == "kind"
    # A spec stored before kinds existed is a TVKD job.
    assert JobSpec.from_dict({**base, "train": {}}).kind == "tvkd"


def test_cli_sft(train_models, arith_data, tmp_path, capsys):
    from tvkd.cli import main

    out = tmp_path / "sft-out"
    argv = [
        "sft",
        "--model", train_models["student"],
        "--data", arith_data,
        "--output", str(out),
        "--device", "cpu",
        "--batch-size", "8",
        "--learning-rate", "3e-3",
        "--max-steps", "3",
        "--max-length", "64",
        "--eval-fraction", "0.125",
        "--no-resume",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and str(out / "model") in printed
    record = read_result(out)
    assert record.status == "completed" and record.steps == 3
    assert record.spec["kind"] == "sft" and record.spec["train"]["learning_rate"] == 3e-3
    assert record.data["eval_pairs"] == 8 and record.precompute is None
    assert record.eval_metrics["loss"] > 0 and (out / "model" / "config.json").is_file()
    # A TVKD setting is a usage error; so is a bad value, named.
    with pytest.raises(SystemExit) as info:
        main([*argv, "--alpha", "0.5"])
    assert info.value.code == 2
    assert main([*argv, "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sft", "train"])
def test_cli_names_an_empty_dataset_and_a_bad_config_file(command, train_models, tmp_path, capsys):
    """An empty dataset, or a --config file that is not JSON, is an `error:` line naming the file,
    never a traceback (both crashed with a bare ValueError / an unnamed JSONDecodeError)."""
    from tvkd.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = [command, "--student", train_models["student"], "--data", str(empty)]
    argv += ["--output", str(tmp_path / "o"), "--device", "cpu", "--max-steps", "1", "--no-resume"]
    if command == "train":
        argv += ["--alpha", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {empty}: no_pairs: the dataset holds no pairs" in err and "Traceback" not in err

    bad = tmp_path / "bad.json"
    bad.write_text("{\n")
    assert main([*argv, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--config {bad}: not valid JSON" in err
