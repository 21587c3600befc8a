"""tvkd.trl.TVKDTrainer against tvkd_loss and against TRL's own DPOTrainer (TRL pinned by the
`trl` extra).

One tiny student and a teacher sharing its tokenizer (conftest `train_models`), six arithmetic
pairs. TRL computes the loss of one collated batch inside the trainer; the test recomputes the
same batch independently: per-token log-probs of the trained and the initial student from their
logits (float64 log-softmax), the teacher's values read from the value store by row, and
`tvkd_loss` on them."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture
def pairs(arith_data: str):
    """Six arithmetic pairs (conftest's `arith_data`) as TRL takes them: a datasets.Dataset."""
    from datasets import Dataset

    return lambda: Dataset.from_json(arith_data).select(range(6))


def _config(tmp_path, **kw):
    from tvkd.trl import TVKDConfig

    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 6,
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "max_length": 64,
        "save_strategy": "no",
        "value_store_root": str(tmp_path / "values"),
    }
    return TVKDConfig(**{**settings, **kw})


def _student(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _perturb(model) -> None:
    """Make the policy differ from the reference TRL precomputed from the initial weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _trl_loss(trainer, batch) -> float:
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss)


def _response_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) per-token log-probs [B, T] left-aligned, and their masks, in float64."""
    from tvkd.logps import logits_logps

    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
    token = logits_logps(logits[:, :-1], ids[:, 1:])  # position i predicts token i+1
    mask = completion[:, 1:]
    lengths = mask.sum(-1)
    out = torch.zeros(ids.shape[0], int(lengths.max()), dtype=torch.float64)
    for b in range(ids.shape[0]):
        out[b, : lengths[b]] = token[b][mask[b]]
    packed_mask = torch.arange(out.shape[1])[None] < lengths[:, None]
    (lc, lr), (mc, mr) = out.chunk(2), packed_mask.chunk(2)
    return lc, lr, mc, mr


@pytest.mark.parametrize("source", ["logits", "implicit"])
def test_loss_equals_tvkd_loss_on_the_same_batch(train_models, pairs, tmp_path, source):
    from tvkd.losses import tvkd_loss
    from tvkd.trl import TVKDTrainer

    model, tokenizer = _student(train_models["student"])
    initial = copy.deepcopy(model)
    # "implicit": V from the teacher's log-ratio to its reference (here the student folder), pre_eos.
    options = (
        {"q_source": "implicit", "terminal": "pre_eos", "value_beta": 0.5} if source == "implicit" else {}
    )
    args = _config(
        tmp_path, alpha=0.7, beta=0.1, gamma=0.9, teacher_model_name_or_path=train_models["teacher"],
        teacher_reference_model_name_or_path=train_models["student"], **options,
    )  # fmt: skip
    trainer = TVKDTrainer(model=model, args=args, train_dataset=pairs(), processing_class=tokenizer)
    store = trainer.value_stores["train"]
    _perturb(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    got = _trl_loss(trainer, batch)

    policy_c, policy_r, mask_c, mask_r = _response_logps(trainer.model, batch)
    ref_c, ref_r, _, _ = _response_logps(initial, batch)
    # TRL's precomputed reference sums are the initial student's (float32 against float64).
    torch.testing.assert_close(
        batch["ref_chosen_logps"].double(), (ref_c * mask_c).sum(-1), rtol=1e-4, atol=1e-4
    )

    def values(side: str, mask: torch.Tensor) -> torch.Tensor:
        rows = [
            torch.tensor(getattr(store.pair(int(i)), f"{side}_values"), dtype=torch.float64)
            for i in batch["tvkd_index"]
        ]
        out = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.float64)
        for b, row in enumerate(rows):
            assert len(row) == int(mask[b].sum()) + 1  # T+1 values per response of T tokens
            out[b, : len(row)] = row
        return out

    want, metrics = tvkd_loss(
        policy_c, policy_r, ref_c, ref_r, values("chosen", mask_c), values("rejected", mask_r),
        mask_c, mask_r, alpha=0.7, beta=0.1, gamma=0.9, terminal=options.get("terminal", "model"),
        shaping="value",
    )  # fmt: skip
    assert store.fields["q_source"] == source
    assert metrics["tvkd/shaping_chosen"] != 0.0  # the shaping is really in play
    assert got == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    logged = trainer._metrics["eval"]
    assert logged["tvkd/shaping_chosen"][-1] == pytest.approx(metrics["tvkd/shaping_chosen"], rel=1e-4)
    assert logged["rewards/accuracies"][-1] == pytest.approx(metrics["tvkd/shaped_accuracy"])


def test_alpha_zero_is_trls_own_dpo_loss(train_models, pairs, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from tvkd.trl import TVKDTrainer

    model, tokenizer = _student(train_models["student"])
    twin = copy.deepcopy(model)
    tvkd = TVKDTrainer(
        model=model, args=_config(tmp_path, alpha=0.0), train_dataset=pairs(), processing_class=tokenizer
    )
    dpo_args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=6, report_to=[], use_cpu=True,
        bf16=False, max_length=64, save_strategy="no", precompute_ref_log_probs=True, loss_type=["sigmoid"],
    )  # fmt: skip
    dpo = DPOTrainer(model=twin, args=dpo_args, train_dataset=pairs(), processing_class=tokenizer)
    for trainer in (tvkd, dpo):
        _perturb(trainer.model)
    batch = next(iter(tvkd.get_train_dataloader()))
    plain = {k: v for k, v in batch.items() if k not in ("tvkd_index", "chosen_values", "rejected_values")}
    assert _trl_loss(tvkd, batch) == pytest.approx(_trl_loss(dpo, plain), rel=1e-6)
    assert "chosen_values" not in batch  # no teacher: nothing was read


def test_settings_are_checked_by_name(tmp_path):
    from tvkd.config import ConfigError
    from tvkd.trl import TVKDTrainer

    for kw, name in (
        ({"gamma": 1.5}, "gamma"),
        ({"loss_type": ["ipo"]}, "loss_type"),
        ({"shaping": "logit"}, "shaping"),
        ({"ld_alpha": 0.5}, "ld_alpha"),
    ):
        with pytest.raises(ConfigError) as info:
            _config(tmp_path, **kw)
        assert info.value.field == name
    assert _config(tmp_path, length_normalize=True).loss_type == ["sigmoid_norm"]
    with pytest.raises(ConfigError) as info:
        TVKDTrainer(model=None, args=_config(tmp_path, alpha=0.5))
    assert info.value.field == "teacher_model_name_or_path"


def test_an_existing_trl_script_trains_with_its_callbacks(train_models, pairs, tmp_path):
    """trainer.train() as a TRL script runs it: a TrainerCallback sees TRL's and tvkd's metrics in
    each log; the teacher's values come from the store the first trainer computed (a cache hit)."""
    from transformers import TrainerCallback

    from tvkd.trl import TVKDTrainer

    seen: list[dict[str, float]] = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}))

    args = _config(
        tmp_path, alpha=0.7, max_steps=2, logging_steps=1, per_device_train_batch_size=3, learning_rate=1e-3,
        teacher_model_name_or_path=train_models["teacher"],
    )  # fmt: skip
    for attempt in range(2):
        model, tokenizer = _student(train_models["student"])
        trainer = TVKDTrainer(
            model=model, args=args, train_dataset=pairs(), processing_class=tokenizer, callbacks=[Logs()]
        )
        assert trainer.values_cached["train"] is (attempt == 1)
    trainer.train()
    steps = [log for log in seen if "loss" in log]
    assert len(steps) == 2
    for log in steps:
        assert {"rewards/accuracies", "tvkd/shaping_chosen", "tvkd/shaping_accuracy"} <= set(log)
        assert torch.isfinite(torch.tensor(log["loss"]))
