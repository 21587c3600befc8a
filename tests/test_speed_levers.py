"""Every speed lever of the training step gives the plain path's numbers (CPU, tiny real models).

The levers (bench/levers.py measures each on and off): sequence packing without padding
(`padding_free`), `torch.compile` of the decoder (`torch_compile`), the chunked fused head
(`linear_logps`, against the plain full-logits path), activation checkpointing, and a larger
micro batch (one micro-batch of 2B pairs against two of B, accumulated). The reference is the
plain path: the unpadded row's full logits, log-softmax in float64 (`plain_logps`).

Tolerances: log-probs within 1e-5 absolute of the float64 plain path (float32 arithmetic over
a few hundred logits); gradients (of a test loss, or the trainer step's clipped gradients)
within atol 1e-6 + rtol 1e-4 of the lever-off path. torch.compile is checked with the aot_eager backend
(see COMPILE_BACKEND).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tvkd.batch import collate, packed_layout, policy_logps
from tvkd.config import TrainConfig
from tvkd.modeling import set_activation_checkpointing
from tvkd.trainer import Trainer

EVAL = 8
LOGP_ATOL = 1e-5
# Dynamo's graph capture + AOT autograd, without inductor's C++ code generation: what this code
# controls (the decoder wrapper, dynamic shapes, the custom head's autograd outside the graph).
# Inductor itself compiles for minutes on 2 busy cores; bench/levers.py runs it.
COMPILE_BACKEND = "aot_eager"


def make_trainer(models, pairs, store, out: Path, **settings) -> Trainer:
    config = TrainConfig.from_dict(
        {"batch_size": 4, "learning_rate": 3e-3, "max_length": 64, "num_samples": 0, "alpha": 0.7, **settings}
    )
    n = len(pairs)
    return Trainer(
        config,
        student=models["student"],
        teacher=models["teacher"],
        pairs=pairs,
        train_idx=range(n - EVAL),
        eval_idx=range(n - EVAL, n),
        store=store,
        output_dir=out,
    )


def plain_logps(model, example, side: str) -> torch.Tensor:
    """log π(y_t | s_t) the plain way: full logits of the unpadded row, log-softmax in float64."""
    response = getattr(example, f"{side}_ids")
    ids = torch.tensor(np.concatenate([example.prompt_ids, response]))[None]
    logits = model(input_ids=ids).logits[0].double()
    p = len(example.prompt_ids)
    logp = logits[p - 1 : p - 1 + len(response)].log_softmax(-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def setup(train_models, arith_store, tmp_path_factory):
    """A set-up trainer and a batch of pairs of different lengths (padding is exercised)."""
    pairs, store = arith_store
    trainer = make_trainer(train_models, pairs, store, tmp_path_factory.mktemp("levers"))
    trainer.setup()
    examples = sorted(trainer.train_set, key=lambda e: len(e.prompt_ids) + len(e.chosen_ids))
    examples = examples[:2] + examples[-2:]
    lengths = {
        len(e.prompt_ids) + len(getattr(e, f"{s}_ids")) for e in examples for s in ("chosen", "rejected")
    }
    assert len(lengths) > 1
    return trainer, examples


def _check_against_plain(model, examples, chosen, rejected) -> None:
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        for r, example in enumerate(examples):
            want = plain_logps(model, example, side)
            row = got[r, : len(want)].detach().double()
            torch.testing.assert_close(row, want, atol=LOGP_ATOL, rtol=0.0)
            assert (got[r, len(want) :] == 0).all()  # zero off the response


def _grads(model, chosen, rejected) -> list[torch.Tensor]:
    # A loss that weighs every position differently, so a misplaced log-prob changes the gradient.
    weights = torch.linspace(0.5, 1.5, chosen.numel()).reshape(chosen.shape)
    loss = (chosen * weights).sum() - (rejected * weights.flip(-1)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


def _assert_same_grads(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_packed_layout_puts_rows_back_to_back(setup):
    trainer, examples = setup
    batch = collate(examples, trainer.pad_id)
    ids, position_ids, positions = packed_layout(batch)
    lengths = batch.attention_mask.sum(1)
    assert ids.shape == position_ids.shape == (1, int(lengths.sum()))
    assert int((position_ids[0] == 0).sum()) == batch.input_ids.shape[0]  # one restart per row
    assert torch.equal(ids[0, positions + 1], batch.labels)  # each position predicts its label


def test_padding_free_equals_padded_and_plain(setup):
    trainer, examples = setup
    model, batch = trainer.model, collate(examples, trainer.pad_id)
    padded = policy_logps(model, batch)
    packed = policy_logps(model, batch, packed=True)
    _check_against_plain(model, examples, *packed)
    _assert_same_grads(_grads(model, *packed), _grads(model, *padded))


def test_unfused_head_equals_fused_and_plain(setup):
    trainer, examples = setup
    model, batch = trainer.model, collate(examples, trainer.pad_id)
    fused = policy_logps(model, batch)
    full = policy_logps(model, batch, fused_head=False)
    _check_against_plain(model, examples, *full)
    _check_against_plain(model, examples, *fused)
    _assert_same_grads(_grads(model, *full), _grads(model, *fused))


def test_activation_checkpointing_gives_the_same_gradients(setup):
    trainer, examples = setup
    model, batch = trainer.model, collate(examples, trainer.pad_id)
    plain = _grads(model, *policy_logps(model, batch))
    set_activation_checkpointing(model, True)
    try:
        chosen, rejected = policy_logps(model, batch)
        _check_against_plain(model, examples, chosen, rejected)
        checkpointed = _grads(model, chosen, rejected)
    finally:
        set_activation_checkpointing(model, False)
    _assert_same_grads(checkpointed, plain)


def test_compiled_decoder_equals_eager(setup):
    trainer, examples = setup
    model, batch = trainer.model, collate(examples, trainer.pad_id)
    decoder = torch.compile(model.get_decoder(), dynamic=True, backend=COMPILE_BACKEND)
    compiled = policy_logps(model, batch, decoder=decoder)
    _check_against_plain(model, examples, *compiled)
    _assert_same_grads(_grads(model, *compiled), _grads(model, *policy_logps(model, batch)))


def test_trainer_levers_and_larger_micro_batch_take_the_plain_step(
    train_models, arith_store, tmp_path, monkeypatch
):
    """One trainer step over the same 8 pairs: plain (two micro-batches of 4, accumulated)
    against one micro-batch of 8, and against padding_free + torch_compile (+ checkpointing)."""
    pairs, store = arith_store
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, **{**kw, "backend": COMPILE_BACKEND}))

    def run(name: str, **settings) -> list[torch.Tensor]:
        """The clipped gradients the trainer's step hands to AdamW (its update, a sign-like
        g / (|g| + eps), would magnify float32 noise of near-zero gradients)."""
        trainer = make_trainer(train_models, pairs, store, tmp_path / name, **settings)
        trainer.setup()
        grads: list[torch.Tensor] = []
        trainer.optimizer.step = lambda: grads.extend(p.grad.clone() for p in trainer.params)
        chosen = trainer.train_set[:8]
        size = trainer.config.batch_size
        trainer.train_step([chosen[k : k + size] for k in range(0, 8, size)])
        trainer.cleanup()
        return grads

    plain = run("plain", batch_size=4, grad_accum=2)
    assert max(float(g.abs().max()) for g in plain) > 1e-3  # not vacuous
    others = {
        "micro batch 8": run("big", batch_size=8, grad_accum=1),
        "padding_free + torch_compile + checkpointing": run(
            "levers",
            batch_size=4,
            grad_accum=2,
            padding_free=True,
            torch_compile=True,
            gradient_checkpointing=True,
        ),
    }
    for name, grads in others.items():
        assert len(grads) == len(plain), name
        for a, b in zip(grads, plain, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
