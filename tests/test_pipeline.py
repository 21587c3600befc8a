"""End-to-end tests of tvkd.pipeline and `tvkd train` on tiny real models (CPU): a learnable
arithmetic preference task through validate → precompute → train → evaluate, early failures,
and the command line."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tvkd.alignment import check_alignment
from tvkd.artifacts import RESULT_VERSION, read_result
from tvkd.config import ConfigError, JobSpec, MethodConfig, TrainConfig
from tvkd.data import PreferencePair
from tvkd.pipeline import precompute, validate
from tvkd.run_job import run_job

TOKEN_KEYS = {"text", "id", "logratio", "value", "psi", "teacher_logp"}


def spec_for(models, data, tmp_path, *, teacher="teacher", **settings) -> JobSpec:
    config = TrainConfig.from_dict({"max_length": 64, "eval_fraction": 0.125, **settings})
    return JobSpec(
        teacher=models[teacher] if teacher else None,
        student=models["student"],
        dataset=data,
        train=config,
        output_dir=str(tmp_path / "job"),
        store_root=str(tmp_path / "stores"),
    )


def test_run_job_learns_the_arithmetic_task(train_models, arith_data, recording_callbacks, tmp_path):
    from transformers import AutoModelForCausalLM

    # 56 training pairs, 8 per step, 6 epochs: 42 steps of TVKD (α = 0.7, teacher values).
    spec = spec_for(
        train_models, arith_data, tmp_path, epochs=6, batch_size=8, learning_rate=3e-3, num_samples=3
    )
    cb = recording_callbacks()
    job = run_job(spec, cb)
    assert job.status == "completed"
    result = job.train
    assert result.steps == 42 and result.train_pairs == 56 and result.eval_pairs == 8
    for stage in ("validate", "precompute", "reference", "train", "save", "evaluate", "samples"):
        assert stage in cb.stages

    train = [m for m in result.history if m["split"] == "train"]
    loss = [m["loss"] for m in train]
    accuracy = [m["rewards/accuracies"] for m in train]
    first, last = statistics.mean(loss[:5]), statistics.mean(loss[-5:])
    assert last < first - 0.2, (first, last)
    assert statistics.mean(accuracy[-5:]) > statistics.mean(accuracy[:5])
    assert statistics.mean(accuracy[-5:]) >= 0.9
    for name in ("loss", "grad_norm", "lr", "epoch", "rewards/margins", "tvkd/shaping_accuracy"):
        assert name in train[-1]
    assert train[-1]["epoch"] == pytest.approx(6.0)

    # Held-out metrics over all 8 eval pairs, by the evaluate stage from the saved model folder.
    evaluation = job.evaluation
    assert evaluation is not None and evaluation.step == 42
    assert evaluation.metrics["pairs"] == 8
    assert {"loss", "rewards/accuracies", "tvkd/shaped_accuracy"} <= set(evaluation.metrics)
    assert result.history[-1] == {"step": 42, "split": "eval", **evaluation.metrics}

    # samples.json: the first num_samples eval pairs, token by token.
    samples = json.loads(Path(evaluation.samples_path).read_text())
    assert samples["teacher_logp_source"] == "teacher"  # no token stats in the store: teacher rerun
    assert len(samples["samples"]) == 3
    for sample in samples["samples"]:
        assert {"index", "row", "prompt", "chosen", "rejected"} <= set(sample)
        assert sample["index"] in job.prepared.eval_idx
        for side in ("chosen", "rejected"):
            part = sample[side]
            assert part["text"] == getattr(job.prepared.pairs[sample["index"]], side)
            assert part["tokens"] and all(set(t) == TOKEN_KEYS for t in part["tokens"])
            assert all(
                isinstance(t["teacher_logp"], float) and t["teacher_logp"] <= 0 for t in part["tokens"]
            )
            # γ = 1, terminal = model: Σψ telescopes to V(end) − V(prompt end).
            assert part["sum_psi"] == pytest.approx(part["value_end"] - part["tokens"][0]["value"], abs=1e-5)
            assert part["sum_logratio"] == pytest.approx(sum(t["logratio"] for t in part["tokens"]), abs=1e-6)

    # A plain Hugging Face folder, and result.json.
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.config.vocab_size == 512
    record = json.loads(Path(job.result_path).read_text())
    assert record["status"] == "completed" and record["steps"] == 42
    assert record["eval_metrics"]["pairs"] == 8
    assert record["paths"]["model"] == result.model_dir and Path(record["paths"]["store"]).is_dir()
    assert record["data"]["train_pairs"] == 56 and record["data"]["report"]["kept"] == 64
    assert set(record["timings"]) == {"validate", "precompute", "train", "evaluate"}
    assert record["spec"]["train"]["learning_rate"] == 3e-3

    # The teacher values are content-addressed: a second job finds them.
    again = precompute(spec, validate(spec))
    assert again.cached and again.key == record["precompute"]["key"]


def test_plain_dpo_job_without_teacher(train_models, arith_data, tmp_path):
    spec = spec_for(
        train_models, arith_data, tmp_path, teacher=None, alpha=0.0, max_steps=2, batch_size=8, num_samples=1
    )
    job = run_job(spec)
    assert job.status == "completed" and job.precompute is None
    samples = json.loads(Path(job.evaluation.samples_path).read_text())
    assert samples["teacher_logp_source"] is None and samples["note"]


def test_validate_fails_early(train_models, arith_data, tmp_path, tiny_tokenizer_factory):
    # Action-dependent shaping cannot cross tokenizers: named in the error, before any weights load.
    spec = spec_for(train_models, arith_data, tmp_path, teacher="other", shaping="logprob")
    with pytest.raises(ConfigError) as info:
        validate(spec)
    assert info.value.field == "shaping" and "shaping" in str(info.value)
    # A method that uses the teacher needs one.
    with pytest.raises(ConfigError) as info:
        validate(spec_for(train_models, arith_data, tmp_path, teacher=None))
    assert info.value.field == "teacher"
    # Conversational data with a tokenizer that has no chat template.
    conv = [PreferencePair(0, "", "Four.", "Five.", ({"role": "user", "content": "2+2?"},))]
    with pytest.raises(ConfigError) as info:
        check_alignment(MethodConfig(), conv, student_tokenizer=tiny_tokenizer_factory(chat_template=None))
    assert info.value.field == "student" and "chat template" in str(info.value)


def test_later_stages_load_what_validate_prepared(train_models, arith_data, tmp_path):
    """prepared.json carries validate's split to a later stage, which re-reads the pairs (it needs
    them) but checks nothing again; a dataset changed since validate is refused."""
    import shutil

    from tvkd.prepared import PREPARED_FILE, DatasetChanged, load_prepared, write_prepared

    student = tmp_path / "student"
    shutil.copytree(train_models["student"], student)
    data = tmp_path / "pairs.jsonl"
    shutil.copy(arith_data, data)
    spec = spec_for({**train_models, "student": str(student)}, str(data), tmp_path, teacher=None, alpha=0.0)
    prepared = validate(spec)
    path = write_prepared(tmp_path / "job" / PREPARED_FILE, prepared)
    # The student's tokenizer is gone: validating again would fail, loading what it prepared does not.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (student / name).unlink()
    with pytest.raises(Exception, match="tokenizer"):
        validate(spec)
    loaded = load_prepared(spec, path)
    assert (loaded.train_idx, loaded.eval_idx) == (prepared.train_idx, prepared.eval_idx)
    assert loaded.dataset_fingerprint == prepared.dataset_fingerprint
    assert [p.chosen for p in loaded.pairs] == [p.chosen for p in prepared.pairs]
    # One changed row: the stage refuses to go on with other data than were checked.
    rows = data.read_text().splitlines()
    row = json.loads(rows[3])
    rows[3] = json.dumps({**row, "chosen": row["chosen"] + " (edited)"})
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetChanged, match="changed since the validate stage"):
        load_prepared(spec, path)


def test_cli_train(train_models, arith_data, tmp_path, capsys):
    from tvkd.cli import build_parser, main

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--alpha", "--value-beta", "--q-source", "--batch-size", "--lora", "--lora-target-modules"):
        assert flag in help_text
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"learning_rate": 1e-3, "batch_size": 16, "method": {"beta": 0.2}}))
    out = tmp_path / "cli-out"
    argv = [
        "train",
        "--teacher", train_models["teacher"],
        "--student", train_models["student"],
        "--data", arith_data,
        "--output", str(out),
        "--store-root", str(tmp_path / "stores"),
        "--device", "cpu",
        "--config", str(config),
        "--alpha", "0.5",
        "--value-beta", "2.0",
        "--batch-size", "4",
        "--max-steps", "3",
        "--max-length", "64",
        "--eval-fraction", "0.125",
        "--num-samples", "1",
        "--no-resume",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and str(out / "model") in printed
    record = read_result(out / "result.json")
    assert record.version == RESULT_VERSION and record.paths.model == str(out / "model")
    train = record.spec["train"]
    assert train["batch_size"] == 4 and train["learning_rate"] == 1e-3  # flag > file > default
    assert train["method"] == {**train["method"], "alpha": 0.5, "beta": 0.2, "value_beta": 2.0}
    assert record.status == "completed" and record.steps == 3
    assert (out / "model" / "config.json").is_file()
    # A bad setting is a usage error naming the field.
    assert main([*argv[:-1], "--gamma", "2"]) == 2
    assert "gamma" in capsys.readouterr().err
