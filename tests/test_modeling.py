"""tvkd.modeling: the one head check shared by the trainer and the teacher pass, the pad-id
fallback and the activation-checkpointing switch, on a tiny real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tvkd.config import ConfigError, PrecomputeConfig, TrainConfig
from tvkd.data import PreferencePair
from tvkd.modeling import head_problem, pad_token_id, set_activation_checkpointing, unwrap
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.teacher import UnsupportedTeacher, compute_pair_signals
from tvkd.trainer import Trainer

PAIR = PreferencePair(row=0, prompt="Q: 2+2=", chosen=" 4", rejected=" 5")


@pytest.fixture
def model(train_models):
    return load_causal_lm(train_models["student"])


@pytest.mark.parametrize(
    "attr", ["logit_scale", "logits_scaling", "output_logits_scale", "mup_width_multiplier"]
)
def test_scaled_logits_are_refused_by_both_users(model, train_models, attr):
    assert head_problem(model, softcap_ok=False) is None and head_problem(model, softcap_ok=True) is None
    setattr(model.config, attr, 1.0)  # 1 means no scaling
    assert head_problem(model, softcap_ok=False) is None
    setattr(model.config, attr, 0.5)
    for softcap_ok in (False, True):
        assert attr in head_problem(model, softcap_ok=softcap_ok)
    with pytest.raises(UnsupportedTeacher, match=attr):
        compute_pair_signals(model, load_tokenizer(train_models["student"]), PAIR, PrecomputeConfig())


def test_softcap_is_for_the_teacher_pass_only(model):
    model.config.final_logit_softcapping = 30.0
    assert head_problem(model, softcap_ok=True) is None
    assert "final_logit_softcapping=30.0" in head_problem(model, softcap_ok=False)


def test_a_head_that_is_not_linear_is_refused(model):
    model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))
    assert "not a plain nn.Linear" in head_problem(model, softcap_ok=True)


def test_trainer_refuses_a_scaled_student(train_models, tmp_path):
    student = Path(shutil.copytree(train_models["student"], tmp_path / "student"))
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "mup_width_multiplier": 4.0}))
    pairs = [
        PreferencePair(row=i, prompt=f"Q: {i}+1=", chosen=f" {i + 1}", rejected=f" {i}") for i in range(4)
    ]
    trainer = Trainer(
        TrainConfig.from_dict({"max_steps": 1, "batch_size": 2, "max_length": 32, "method": {"alpha": 0.0}}),
        student=student,
        teacher=None,
        pairs=pairs,
        train_idx=range(3),
        eval_idx=[3],
        store=None,
        output_dir=tmp_path / "run",
    )
    with pytest.raises(ConfigError, match="mup_width_multiplier") as info:
        trainer.setup()
    assert info.value.field == "student"


def test_pad_token_id_falls_back_to_eos_then_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_activation_checkpointing_switch(model):
    set_activation_checkpointing(model, True)
    assert unwrap(model).is_activation_checkpointing
    set_activation_checkpointing(model, False)
    assert not unwrap(model).is_activation_checkpointing


def test_names_that_moved_to_model_prep_still_import_from_models_with_a_warning() -> None:
    import warnings

    import tvkd.model_prep as model_prep

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from tvkd.models import TINY_SPECIAL_TOKENS, build_tiny_model
    assert TINY_SPECIAL_TOKENS is model_prep.TINY_SPECIAL_TOKENS
    assert build_tiny_model is model_prep.build_tiny_model
    assert any("tvkd.model_prep" in str(w.message) for w in caught if w.category is DeprecationWarning)
    with pytest.raises(ImportError, match="no_such_name"):
        from tvkd.models import no_such_name  # noqa: F401
