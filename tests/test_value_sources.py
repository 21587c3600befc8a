"""MATH.md's options `q_source="implicit"` (+ teacher_reference), `terminal="pre_eos"` and
`sft_weight` through a whole job (tvkd.pipeline and `tvkd train`), the metrics they add, and the
teacher check of tvkd.teacher_check. Tiny real models of tests/conftest.py: the teacher, and the
student folder as the teacher's reference (same tokenizer, other weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tvkd.artifacts import read_result
from tvkd.config import ConfigError, JobOptions, JobSpec, MethodConfig, TrainConfig
from tvkd.pipeline import precompute, validate
from tvkd.run_job import run_job
from tvkd.teacher_check import teacher_check, wilson_interval

NEW_METRICS = ("tvkd/offset", "tvkd/gradient_scale", "nll/chosen")


def spec_for(models, data, tmp_path, *, reference=None, name="job", **settings) -> JobSpec:
    config = TrainConfig.from_dict({"max_length": 64, "eval_fraction": 0.125, "batch_size": 8, **settings})
    return JobSpec(
        teacher=models["teacher"],
        student=models["student"],
        dataset=data,
        train=config,
        output_dir=str(tmp_path / name),
        store_root=str(tmp_path / "stores"),
        options=JobOptions(teacher_reference=reference),
    )


def test_wilson_interval_known_values():
    # Wilson 95% intervals (z = 1.96): 5/10 → [0.2366, 0.7634]; 0/10 → [0, 0.2775]; 81/100 → [0.7222, 0.8749].
    for (k, n), want in {
        (5, 10): (0.2366, 0.7634),
        (0, 10): (0.0, 0.2775),
        (81, 100): (0.7222, 0.8749),
    }.items():
        low, high = wilson_interval(k, n)
        assert (low, high) == pytest.approx(want, abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_teacher_check_matches_the_stored_values(arith_store):
    pairs, store = arith_store
    idx = list(range(0, len(pairs), 2))
    for method in (
        MethodConfig(),
        MethodConfig(terminal="pre_eos"),
        MethodConfig(gamma=0.9, terminal="zero"),
    ):
        check = teacher_check(store, idx, method)
        wins = ties = 0
        for i in idx:  # Σψ from the stored V, float64, written out for each terminal
            sums = []
            for side in ("chosen", "rejected"):
                v = np.asarray(getattr(store.pair(i), f"{side}_values"), np.float64)
                end = {"model": v[-1], "zero": 0.0, "pre_eos": v[-2]}[method.terminal]
                sums.append(sum(method.gamma * x - y for x, y in zip([*v[1:-1], end], v[:-1], strict=True)))
            wins += sums[0] > sums[1]
            ties += sums[0] == sums[1]
        assert check.pairs == len(idx) and check.accuracy == wins / len(idx) and check.ties == ties / len(idx)
        assert (check.low, check.high) == wilson_interval(wins, len(idx))
        assert check.chance == (check.low <= 0.5 <= check.high)
        m = check.metrics()
        assert m["teacher/shaping_accuracy"] == check.accuracy and m["teacher/pairs"] == len(idx)


def test_implicit_pre_eos_sft_weight_job(train_models, arith_data, recording_callbacks, tmp_path):
    settings = dict(q_source="implicit", terminal="pre_eos", sft_weight=1.0, value_beta=0.1, max_steps=3)
    spec = spec_for(train_models, arith_data, tmp_path, reference=train_models["student"], **settings)
    cb = recording_callbacks()
    job = run_job(spec, cb)
    assert job.status == "completed"
    store = job.precompute.store
    assert (
        store.fields["q_source"] == "implicit"
        and store.fields["teacher_reference"] == train_models["student"]
    )
    # At step 0 the student is its own reference: V(s_{t+1}) = β_v·Σ log π_φ/π_student ≠ 0.
    assert any(np.any(store.pair(i).chosen_values != 0) for i in job.prepared.train_idx[:4])
    train = [m for m in job.train.history if m["split"] == "train"]
    for name in (*NEW_METRICS, "tvkd/shaping_accuracy", "tvkd/shaping_ties"):
        assert all(math.isfinite(m[name]) for m in train), name
    assert set(NEW_METRICS) <= set(job.evaluation.metrics)
    # The teacher check: at step 0, split "teacher", in result.json, and an event about it.
    teacher_points = [(step, m) for step, split, m in cb.metrics if split == "teacher"]
    assert len(teacher_points) == 1 and teacher_points[0][0] == 0
    got = teacher_points[0][1]
    assert 0.0 <= got["teacher/shaping_accuracy_low"] <= got["teacher/shaping_accuracy"] <= 1.0
    assert got["teacher/pairs"] == len(job.prepared.train_idx)
    record = read_result(job.result_path)
    check = record.precompute["teacher_check"]
    assert check["accuracy"] == got["teacher/shaping_accuracy"]
    level = "warning" if check["chance"] else "info"
    assert any(lv == level and "teacher shaping accuracy" in msg for lv, msg in cb.events)
    assert record.spec["options"]["teacher_reference"] == train_models["student"]
    assert record.spec["train"]["method"]["sft_weight"] == 1.0

    # The terminal is applied to the stored V at training time: another terminal reuses the store.
    other = spec_for(train_models, arith_data, tmp_path, reference=train_models["student"], **{
        **settings, "terminal": "model"})  # fmt: skip
    again = precompute(other, validate(other))
    assert again.cached and again.store.path == store.path


def test_teacher_equal_to_its_reference_warns(train_models, arith_data, recording_callbacks, tmp_path):
    spec = spec_for(
        train_models, arith_data, tmp_path, reference=train_models["teacher"], q_source="implicit"
    )
    cb = recording_callbacks()
    result = precompute(spec, validate(spec, cb), cb)
    assert result.teacher_check.ties == 1.0 and result.teacher_check.chance  # V ≡ 0 (property 9)
    assert any(lv == "warning" and "every pair ties" in msg for lv, msg in cb.events)


def test_implicit_needs_a_teacher_reference(train_models, arith_data, tmp_path):
    with pytest.raises(ConfigError) as info:
        validate(spec_for(train_models, arith_data, tmp_path, q_source="implicit"))
    assert info.value.field == "teacher_reference"
    with pytest.raises(ConfigError) as info:
        validate(
            spec_for(train_models, arith_data, tmp_path, reference=train_models["other"], q_source="implicit")
        )
    assert info.value.field == "teacher_reference" and "tokenizer" in str(info.value)


def test_plain_dpo_has_no_shaping_accuracy(train_models, arith_data, tmp_path):
    spec = spec_for(train_models, arith_data, tmp_path, alpha=0.0, max_steps=2, num_samples=0)
    job = run_job(spec)
    assert job.precompute is None
    for metrics in [m for m in job.train.history] + [job.evaluation.metrics]:
        assert "tvkd/shaping_accuracy" not in metrics and "nll/chosen" in metrics
        assert metrics["tvkd/offset"] == 0.0 and metrics["tvkd/gradient_scale"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "flags",
    [
        ["--q-source", "implicit", "--teacher-reference", "{student}", "--value-beta", "0.1"],
        ["--terminal", "pre_eos"],
        ["--sft-weight", "0.5"],
    ],
)
def test_cli_train_options(train_models, arith_data, tmp_path, capsys, flags):
    from tvkd.cli import main

    out = tmp_path / "cli-out"
    argv = [
        "train",
        "--teacher", train_models["teacher"],
        "--student", train_models["student"],
        "--data", arith_data,
        "--output", str(out),
        "--store-root", str(tmp_path / "stores"),
        "--device", "cpu",
        "--batch-size", "8",
        "--max-steps", "2",
        "--max-length", "64",
        "--eval-fraction", "0.125",
        "--num-samples", "0",
        "--no-resume",
        *[f.format(**train_models) for f in flags],
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "teacher shaping accuracy" in printed.out and "nll/chosen" in printed.out
    record = read_result(out / "result.json")
    method = record.spec["train"]["method"]
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        name = flag[2:].replace("-", "_")
        if name == "teacher_reference":
            assert record.spec["options"]["teacher_reference"] == train_models["student"]
        else:
            assert str(method[name]) == value
    assert json.loads(Path(out / "result.json").read_text())["precompute"]["teacher_check"]["pairs"] == 56


def test_pre_eos_uses_the_terminal_value_of_a_cut_response(train_models, arith_data):
    """A response cut by truncation (keep_start) has no end token: pre_eos keeps its V(s_{T+1})."""
    import torch

    from tvkd.batch import build_train_pairs, collate
    from tvkd.data import load_pairs
    from tvkd.losses import tvkd_loss
    from tvkd.models import load_tokenizer
    from tvkd.tokenize import end_token_ids, tokenize_pair

    tok = load_tokenizer(train_models["student"])
    pairs, _ = load_pairs(arith_data)
    whole = tokenize_pair(tok, pairs[0], max_length=64)
    cut = tokenize_pair(tok, pairs[0], max_length=len(whole.prompt_ids) + 1, truncation_mode="keep_start")
    ends = end_token_ids(tok)
    assert whole.chosen_ids[-1] in ends and cut.chosen_ids[-1] not in ends

    train, _ = build_train_pairs(pairs, [0, 1], tokenizer=tok, max_length=64)
    assert all(p.chosen_ended and p.rejected_ended for p in train)
    assert "chosen_ended" not in collate(train, 0).teacher  # all end: nothing to pass
    rng = np.random.default_rng(0)
    for p in train:
        p.chosen_values = rng.normal(size=len(p.chosen_ids) + 1).astype(np.float32)
        p.rejected_values = rng.normal(size=len(p.rejected_ids) + 1).astype(np.float32)
        p.ref_chosen, p.ref_rejected = (
            np.zeros(len(p.chosen_ids), np.float32),
            np.zeros(len(p.rejected_ids), np.float32),
        )
    train[0].chosen_ended = False
    batch = collate(train, 0)
    assert batch.teacher["chosen_ended"].tolist() == [False, True] and "rejected_ended" not in batch.teacher
    zeros = torch.zeros(batch.response_mask.shape)
    sides = [*batch.split(zeros), *batch.split(batch.ref_logps), *batch.split(batch.values)]
    _, m = tvkd_loss(
        *sides, *batch.split(batch.response_mask), terminal="pre_eos", alpha=1.0, **batch.teacher
    )
    c0, c1 = train[0].chosen_values, train[1].chosen_values
    want = ((c0[-1] - c0[0]) + (c1[-2] - c1[0])) / 2  # row 0 cut: V(s_{T+1}); row 1: V(s_T)
    assert m["tvkd/shaping_chosen"] == pytest.approx(float(want), abs=1e-6)


def test_cli_table_says_n_a_when_the_shaping_is_off():
    from tvkd.cli.train import _table

    lines = _table({"loss": 0.69, "nll/chosen": 2.0}, {"loss": 0.7}).splitlines()
    row = next(line for line in lines if line.startswith("tvkd/shaping_accuracy"))
    assert row.split()[1:] == ["n/a", "n/a"]
