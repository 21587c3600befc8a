"""Model context windows (tvkd.windows): the effective max_length is the smaller of the setting
and the student's and teacher's windows; longer rows are named bad rows or cut by TRL's
truncation modes, and nothing runs past a window (a GPT-2 student with 32 learned positions
used to end the reference pass with `IndexError: index out of range in self`)."""

from __future__ import annotations

import json

import pytest
import torch

from tvkd.config import JobSpec, PrecomputeConfig, TrainConfig
from tvkd.data import load_pairs
from tvkd.pipeline import precompute_config, validate
from tvkd.precompute import precompute_values
from tvkd.trainer import Trainer
from tvkd.windows import config_window, effective_max_length

WINDOW = 32
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)  # far beyond 32 tokens


@pytest.fixture(scope="module")
def window_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama (512 positions), a tiny Llama of WINDOW positions (RoPE) and a GPT-2 of WINDOW
    learned positions, all with the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tvkd.model_prep import build_tiny_model
    from tvkd.models import load_tokenizer

    root = tmp_path_factory.mktemp("windows")
    wide = build_tiny_model(root / "wide", seed=0)
    rope = build_tiny_model(root / "rope32", seed=1, max_position_embeddings=WINDOW)
    tok = load_tokenizer(str(wide))
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=WINDOW, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return {"wide": str(wide), "rope32": str(rope), "gpt2": str(root / "gpt2")}


@pytest.fixture(scope="module")
def long_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six short pairs and, as row 2, one whose prompt is far longer than WINDOW tokens."""
    rows = [{"prompt": f"Q: {a}+1=", "chosen": f" {a + 1}", "rejected": f" {a + 2}"} for a in range(6)]
    rows.insert(2, {"prompt": LONG, "chosen": " yes", "rejected": " no"})
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_window_is_read_from_the_config(window_models):
    from tvkd.models import load_config

    assert config_window(load_config(window_models["gpt2"])).tokens == WINDOW  # GPT-2: n_positions
    limit = effective_max_length(1024, {"student": window_models["gpt2"], "teacher": window_models["wide"]})
    assert (limit.max_length, limit.requested) == (WINDOW, 1024)
    assert "student" in limit.limited_by and "=32" in limit.note()
    # The smaller of the two windows wins, whichever side it is on; a setting below both stays.
    limit = effective_max_length(1024, {"student": window_models["wide"], "teacher": window_models["rope32"]})
    assert limit.max_length == WINDOW and "teacher" in limit.limited_by
    assert effective_max_length(16, {"student": window_models["gpt2"]}).limited_by is None


@pytest.mark.parametrize("student", ["gpt2", "rope32"])
def test_trainer_never_runs_past_the_students_window(window_models, long_data, tmp_path, student):
    pairs, _ = load_pairs(long_data)
    config = TrainConfig.from_dict({"batch_size": 2, "max_steps": 2, "method": {"alpha": 0.0}})
    assert config.max_length == 1024  # the default, far beyond the window
    trainer = Trainer(
        config, student=window_models[student], teacher=None, pairs=pairs, train_idx=range(5),
        eval_idx=range(5, 7), store=None, output_dir=tmp_path,
    )  # fmt: skip
    trainer.setup()  # used to raise IndexError (GPT-2) or run 100+ positions past a RoPE window
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed"
    assert [(d["row"], d["code"]) for d in result.dropped] == [(2, "too_long")]
    assert all(len(p.prompt_ids) + len(p.chosen_ids) <= WINDOW for p in trainer.train_set)


def test_truncation_mode_keeps_long_rows_within_the_window(window_models, long_data, tmp_path):
    # Row 2 has a long prompt: keep_end keeps its end. keep_start keeps prompts whole, so it is
    # tried on a long response (row 2 of a second file) and cuts that response's end.
    short, _ = load_pairs(long_data)
    rows = [{"prompt": f"Q: {a}+1=", "chosen": f" {a + 1}", "rejected": f" {a + 2}"} for a in range(7)]
    rows[2]["chosen"] = LONG
    (tmp_path / "long_response.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long_response, _ = load_pairs(tmp_path / "long_response.jsonl")
    for mode, pairs in (("keep_end", short), ("keep_start", long_response)):
        config = TrainConfig.from_dict(
            {"batch_size": 2, "max_steps": 1, "truncation_mode": mode, "method": {"alpha": 0.0}}
        )
        trainer = Trainer(
            config, student=window_models["gpt2"], teacher=None, pairs=pairs, train_idx=range(5),
            eval_idx=range(5, 7), store=None, output_dir=tmp_path / mode,
        )  # fmt: skip
        trainer.setup()
        assert trainer.train().status == "completed"
        trainer.cleanup()
        assert not trainer.dropped
        long = next(p for p in trainer.train_set if p.row == 2)
        assert len(long.prompt_ids) + max(len(long.chosen_ids), len(long.rejected_ids)) <= WINDOW


def test_job_validates_and_precomputes_to_the_smallest_window(window_models, long_data, tmp_path):
    spec = JobSpec(
        teacher=window_models["rope32"], student=window_models["wide"], dataset=long_data,
        train=TrainConfig.from_dict({"alpha": 0.5}), output_dir=str(tmp_path / "out"),
        store_root=str(tmp_path / "stores"),
    )  # fmt: skip
    prepared = validate(spec)
    # The student's window is 512, but the teacher's (32) limits the job: row 2 is named.
    issues = prepared.token_reports["student"].issues
    assert [(i.row, i.code) for i in issues] == [(2, "too_long")]
    assert precompute_config(spec).max_length == WINDOW
    # The teacher pass itself never runs past its window, whatever config it is given.
    pairs, _ = load_pairs(long_data)
    result = precompute_values(
        window_models["rope32"], pairs, PrecomputeConfig(max_length=4096), store_root=tmp_path / "s2"
    )
    assert result.store.fields["max_length"] == WINDOW
    assert [(i.row, i.code) for i in result.report.issues] == [(2, "too_long")]


def test_sft_never_runs_past_the_models_window(window_models, long_data, tmp_path):
    from tvkd.config import SFTConfig
    from tvkd.sft import SFTTrainer

    pairs, _ = load_pairs(long_data)
    trainer = SFTTrainer(
        SFTConfig(batch_size=2, max_steps=1), student=window_models["gpt2"], examples=pairs,
        train_idx=range(5), eval_idx=range(5, 7), output_dir=tmp_path,
    )  # fmt: skip
    trainer.setup()  # used to end in IndexError (position embedding) on row 2
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed"
    assert [(d["row"], d["code"]) for d in result.dropped] == [(2, "too_long")]


def test_a_run_whose_held_out_pairs_are_all_dropped_says_so(
    window_models, long_data, tmp_path, recording_callbacks
):
    """A held-out split made only of rows dropped later (here the over-long row 2) used to end
    `completed` with empty eval metrics and no word about it."""
    pairs, _ = load_pairs(long_data)
    config = TrainConfig.from_dict({"batch_size": 2, "max_steps": 1, "method": {"alpha": 0.0}})
    callbacks = recording_callbacks()
    trainer = Trainer(
        config, student=window_models["gpt2"], teacher=None, pairs=pairs, train_idx=[0, 1, 3, 4],
        eval_idx=[2], store=None, output_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip
    trainer.setup()
    trainer.cleanup()
    assert trainer.eval_set == []
    warnings = [text for level, text in callbacks.events if level == "warning"]
    assert any("all 1 held-out pairs were dropped" in text for text in warnings), warnings
