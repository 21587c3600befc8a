"""Numbers that are not finite never pass silently (tvkd.numerics): a NaN teacher fails the
precompute naming the teacher and the row, and nothing non-finite is written to or reused from a
value store; the head check does not pass on NaN; a run whose steps are skipped for non-finite
gradients fails with a code; hyperparameters that overflow the arithmetic are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvkd.batch import build_train_pairs
from tvkd.callbacks import Callbacks
from tvkd.config import ConfigError, MethodConfig, PrecomputeConfig, TrainConfig
from tvkd.data import load_pairs
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.numerics import NonFiniteError, nonfinite_paths
from tvkd.precompute import precompute_values
from tvkd.store import ValueStore
from tvkd.teacher import verify_head
from tvkd.trainer import Trainer

ROWS = [
    {"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Q: 2+2=", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Q: 3+3=", "chosen": " 6 ~", "rejected": " 7"},  # '~' appears in this row only
    {"prompt": "Q: 4+4=", "chosen": " 8", "rejected": " 9"},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nonfinite") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _poisoned(src: str, dst: Path, edit) -> str:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module")
def teachers(train_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """'nan_head': every logit NaN; 'nan_token': the embedding of '~' is NaN, so only row 2's
    sequences (and not the head check on row 0) go NaN."""
    root = tmp_path_factory.mktemp("poisoned")
    tilde = load_tokenizer(train_models["teacher"]).convert_tokens_to_ids("~")

    def nan_head(w: dict[str, torch.Tensor]) -> None:
        w["lm_head.weight"] = torch.full_like(w["lm_head.weight"], float("nan"))

    def nan_token(w: dict[str, torch.Tensor]) -> None:
        w["model.embed_tokens.weight"][tilde] = float("nan")

    return {
        "nan_head": _poisoned(train_models["teacher"], root / "nan_head", nan_head),
        "nan_token": _poisoned(train_models["teacher"], root / "nan_token", nan_token),
    }


def test_head_check_does_not_pass_on_nan(teachers):
    model = load_causal_lm(teachers["nan_head"], dtype=torch.float32)
    with pytest.raises(NonFiniteError) as info:
        verify_head(model, torch.tensor([[1, 5, 7, 9]]))
    assert info.value.code == "nonfinite_teacher"


@pytest.mark.parametrize(("teacher", "row"), [("nan_head", 0), ("nan_token", 2)])
def test_nan_teacher_fails_the_precompute_naming_teacher_and_row(teachers, data, tmp_path, teacher, row):
    pairs, _ = load_pairs(data)
    config = PrecomputeConfig(max_length=64, batch_tokens=1, shard_size=2)  # one sequence a batch
    with pytest.raises(NonFiniteError) as info:
        precompute_values(teachers[teacher], pairs, config, store_root=tmp_path)
    assert info.value.code == "nonfinite_teacher"
    assert teachers[teacher] in str(info.value) and f"(row {row})" in str(info.value)
    # Nothing non-finite was written: no complete store, and the shard of the bad row is absent.
    key_dir = next(tmp_path.iterdir())
    assert not (key_dir / "manifest.json").exists()
    assert not (key_dir / f"shard-{row // 2:05d}.safetensors").exists()


def test_a_store_holding_nan_is_not_reused(train_models, data, tmp_path):
    pairs, _ = load_pairs(data)
    config = PrecomputeConfig(max_length=64)
    first = precompute_values(train_models["teacher"], pairs, config, store_root=tmp_path)
    shard = first.store.path / "shard-00000.safetensors"
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    arrays = load_file(shard)
    arrays["chosen_values"][arrays["chosen_values"].numel() // 2] = float("inf")  # damaged on disk
    save_file(arrays, str(shard), metadata=meta)
    store = ValueStore.open(first.store.path)
    assert store.first_nonfinite() is not None
    with pytest.raises(NonFiniteError) as info:
        precompute_values(train_models["teacher"], pairs, config, store_root=tmp_path)
    assert info.value.code == "nonfinite_store" and str(first.store.path) in str(info.value)
    # A trainer given the store directly refuses it too, naming the pair.
    tokenizer = load_tokenizer(train_models["student"])
    with pytest.raises(NonFiniteError) as info:
        build_train_pairs(pairs, range(len(pairs)), tokenizer=tokenizer, max_length=64, store=store)
    assert info.value.code == "nonfinite_store" and "row" in str(info.value)


def _nan_student(train_models: dict[str, str], dst: Path) -> str:
    def nan_layer(w: dict[str, torch.Tensor]) -> None:
        w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))

    return _poisoned(train_models["student"], dst, nan_layer)


@pytest.mark.parametrize(
    ("settings", "failed_at"),
    [
        ({"max_skipped_steps": 3, "max_skipped_fraction": 1.0}, 3),
        ({"max_skipped_steps": 100, "max_skipped_fraction": 0.2}, 3),
    ],
)
def test_a_run_of_skipped_steps_fails_with_a_code(train_models, data, tmp_path, settings, failed_at):
    pairs, _ = load_pairs(data)
    student = _nan_student(train_models, tmp_path / "student")
    config = TrainConfig.from_dict(
        {"batch_size": 2, "max_steps": 10, "max_length": 64, "method": {"alpha": 0.0}, **settings}
    )
    trainer = Trainer(
        config, student=student, teacher=None, pairs=pairs, train_idx=range(4), eval_idx=[],
        store=None, output_dir=tmp_path / "out",
    )  # fmt: skip
    trainer.setup()
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    trainer.cleanup()
    assert info.value.code == "nonfinite_gradients"
    assert trainer.step == failed_at and trainer.skipped_steps == failed_at
    assert f"stopped at step {failed_at}" in str(info.value)
    assert not (tmp_path / "out" / "model").exists()  # no "completed" model


class _StopAfter(Callbacks):
    """Asks for a stop once `steps` optimizer steps have been reported."""

    def __init__(self, steps: int) -> None:
        self.steps, self.seen = steps, 0

    def on_progress(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        if stage == "train":
            self.seen = done

    def should_stop(self) -> bool:
        return self.seen >= self.steps


def test_a_resumed_run_counts_the_skips_before_its_checkpoint(train_models, data, tmp_path):
    """Every step of the NaN student is skipped; max_skipped_steps=3. The first run stops (and
    checkpoints) after 2 skipped steps; its resume must fail at step 3 (3 in a row), not at step 5
    as a run that forgot the 2 earlier skips would."""
    pairs, _ = load_pairs(data)
    student = _nan_student(train_models, tmp_path / "student")
    config = TrainConfig.from_dict(
        {
            "batch_size": 2,
            "max_steps": 10,
            "max_length": 64,
            "method": {"alpha": 0.0},
            "max_skipped_steps": 3,
            "max_skipped_fraction": 1.0,
        }
    )

    def trainer(resume: bool, callbacks: Callbacks | None = None) -> Trainer:
        t = Trainer(
            config, student=student, teacher=None, pairs=pairs, train_idx=range(4), eval_idx=[],
            store=None, output_dir=tmp_path / "out", callbacks=callbacks, resume=resume,
        )  # fmt: skip
        t.setup()
        return t

    first = trainer(resume=False, callbacks=_StopAfter(2))
    assert first.train().status == "stopped"
    first.cleanup()
    assert (first.step, first.skipped_steps, first.skipped_in_a_row) == (2, 2, 2)
    state = json.loads((first.last_checkpoint / "state.json").read_text())
    assert (state["skipped_steps"], state["skipped_in_a_row"]) == (2, 2)

    resumed = trainer(resume=True)
    assert resumed.resumed_from == 2 and resumed.skipped_steps == 2
    with pytest.raises(NonFiniteError) as info:
        resumed.train()
    resumed.cleanup()
    assert info.value.code == "nonfinite_gradients"
    assert resumed.step == 3 and resumed.skipped_steps == 3
    assert "stopped at step 3" in str(info.value) and "3 steps in a row" in str(info.value)


def test_one_skipped_step_is_tolerated_and_metrics_stay_finite(train_models, data, tmp_path):
    pairs, _ = load_pairs(data)
    student = _nan_student(train_models, tmp_path / "student")
    config = TrainConfig.from_dict(
        {
            "batch_size": 2,
            "max_steps": 1,
            "max_length": 64,
            "method": {"alpha": 0.0},
            "max_skipped_fraction": 1.0,
        }
    )
    trainer = Trainer(
        config, student=student, teacher=None, pairs=pairs, train_idx=range(4), eval_idx=[],
        store=None, output_dir=tmp_path / "out",
    )  # fmt: skip
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    assert result.status == "completed" and trainer.skipped_steps == 1
    assert "loss" not in result.metrics  # NaN is not averaged into a reported metric
    assert not list(nonfinite_paths(result.metrics))


@pytest.mark.parametrize(
    ("field", "value"), [("value_beta", 1e-40), ("value_beta", 1e30), ("alpha", 1e30), ("beta", 1e30)]
)
def test_overflowing_hyperparameters_are_refused(field, value):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({field: value})
    assert info.value.field == field
    with pytest.raises(ConfigError):
        MethodConfig(**{field: value})
    if field == "value_beta":
        with pytest.raises(ConfigError):
            PrecomputeConfig(value_beta=value)


def test_nonfinite_paths_name_every_bad_number():
    value = {"a": 1.0, "b": [0.0, float("nan")], "c": {"d": float("-inf"), "e": "x"}}
    assert list(nonfinite_paths(value, "result")) == ["result.b[1]", "result.c.d"]
