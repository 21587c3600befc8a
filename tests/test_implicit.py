"""`q_source="implicit"` (MATH.md, "Teacher soft value"; property 9) on real tiny models: the
teacher (tests/conftest.py `train_models["teacher"]`) and, as its reference, the student folder
(same tokenizer, other weights). The reference computation below is independent of tvkd.teacher:
full float64 logits of each model, log-softmax, gather, a Python sum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tvkd.config import ConfigError, PrecomputeConfig
from tvkd.data import PreferencePair
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.precompute import precompute_key, precompute_values
from tvkd.teacher import compute_pair_signals
from tvkd.tokenize import tokenize_pair
from tvkd.values import implicit_values, shaping_from_values

PAIRS = [
    PreferencePair(row=0, prompt="Q: 3+4=", chosen=" 7", rejected=" 8"),
    PreferencePair(row=1, prompt="What is 2+5?", chosen=" The answer is 7.", rejected=" The answer is 9."),
    PreferencePair(row=2, prompt="Q: 9+9=", chosen=" 18", rejected=" 17, I think"),
]
# float32 forwards (and float32 storage) against float64 ones: log-probs of a few units agree to
# ~1e-6; a sum over ≤ 12 tokens and β_v ≤ 1 stays within 2e-5 absolute.
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvkd-cache"))


def _token_logps64(model64: Any, ids: list[int], prompt_len: int) -> list[float]:
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0]
    assert logits.dtype == torch.float64
    logp = torch.log_softmax(logits, -1)
    return [float(logp[p - 1, ids[p]]) for p in range(prompt_len, len(ids))]


def test_implicit_values_definition() -> None:
    t = torch.tensor([-1.0, -2.5, -0.25], dtype=torch.float64)
    r = torch.tensor([-1.5, -2.0, -1.0], dtype=torch.float64)
    v = implicit_values(t, r, value_beta=0.5)
    assert v.dtype == torch.float32 and v.shape == (4,)
    np.testing.assert_allclose(v.numpy(), [0.0, 0.25, 0.0, 0.375], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="same"):
        implicit_values(t, r[:2], value_beta=1.0)


@pytest.mark.parametrize("value_beta", [1.0, 0.1])
def test_property9_implicit_sum_psi_is_the_teachers_dpo_reward(
    tmp_path: Path, train_models: dict[str, str], value_beta: float
) -> None:
    teacher, reference = train_models["teacher"], train_models["student"]
    tok = load_tokenizer(teacher)
    res = precompute_values(
        teacher,
        PAIRS,
        PrecomputeConfig(q_source="implicit", value_beta=value_beta, max_length=64, batch_tokens=40),
        store_root=tmp_path,
        teacher_reference=reference,
    )
    assert res.store.fields["q_source"] == "implicit"
    assert res.store.fields["teacher_reference"] == reference
    t64, r64 = load_causal_lm(teacher, dtype=torch.float64), load_causal_lm(reference, dtype=torch.float64)
    for i, pair in enumerate(PAIRS):
        tp = tokenize_pair(tok, pair, max_length=64)
        for side in ("chosen", "rejected"):
            ids = tp.prompt_ids + getattr(tp, f"{side}_ids")
            lp_t = _token_logps64(t64, ids, len(tp.prompt_ids))
            lp_r = _token_logps64(r64, ids, len(tp.prompt_ids))
            want = [0.0]
            for a, b in zip(lp_t, lp_r, strict=True):
                want.append(want[-1] + value_beta * (a - b))  # V(s_{t+1}), float64
            values = getattr(res.store.pair(i), f"{side}_values")
            assert values.dtype == np.float32 and values.shape == (len(lp_t) + 1,)
            np.testing.assert_allclose(values, want, rtol=0, atol=ATOL, err_msg=f"pair {i} {side}")
            # γ = 1, terminal = "model": Σψ is the teacher's implicit DPO reward of the response.
            v = torch.from_numpy(np.array(values, dtype=np.float64))[None]
            psi = shaping_from_values(v, torch.ones(1, len(lp_t), dtype=torch.bool), gamma=1.0)
            reward = value_beta * sum(a - b for a, b in zip(lp_t, lp_r, strict=True))
            assert psi.sum().item() == pytest.approx(reward, abs=ATOL)


def test_property9_teacher_equal_to_its_reference_gives_zero(
    tmp_path: Path, train_models: dict[str, str]
) -> None:
    teacher = train_models["teacher"]
    res = precompute_values(
        teacher,
        PAIRS,
        PrecomputeConfig(q_source="implicit", max_length=64),
        store_root=tmp_path,
        teacher_reference=teacher,
    )
    for i in range(len(PAIRS)):
        pv = res.store.pair(i)
        assert not np.any(pv.chosen_values) and not np.any(pv.rejected_values)  # exactly 0
    # One pair through the inspector's path: the same.
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    _, pv = compute_pair_signals(model, tok, PAIRS[1], PrecomputeConfig(q_source="implicit"), reference=model)
    assert not np.any(pv.chosen_values) and pv.chosen_token_logps is None


def test_implicit_needs_a_reference_with_the_teachers_tokenizer(
    tmp_path: Path, train_models: dict[str, str]
) -> None:
    config = PrecomputeConfig(q_source="implicit", max_length=64)
    with pytest.raises(ConfigError, match="teacher_reference") as missing:
        precompute_values(train_models["teacher"], PAIRS, config, store_root=tmp_path)
    assert missing.value.field == "teacher_reference"
    with pytest.raises(ConfigError, match="tokenizer") as other:
        precompute_key(train_models["teacher"], PAIRS, config, teacher_reference=train_models["other"])
    assert other.value.field == "teacher_reference"
    assert not any(tmp_path.iterdir())  # nothing written


def test_store_key_covers_q_source_and_teacher_reference_but_not_training_options(
    train_models: dict[str, str],
) -> None:
    teacher, student = train_models["teacher"], train_models["student"]

    def key(reference: str | None = None, **kw: Any) -> str:
        return precompute_key(teacher, PAIRS, PrecomputeConfig(**kw), teacher_reference=reference)[0]

    keys = {
        "logits": key(),
        "logprobs": key(q_source="logprobs"),
        "implicit/student": key(student, q_source="implicit"),
        "implicit/teacher": key(teacher, q_source="implicit"),
    }
    assert len(set(keys.values())) == len(keys)
    # A reference only matters to the implicit values: other sources ignore it (same store).
    assert key(student) == keys["logits"]
    # γ, terminal and shaping are applied to the stored V at training time: they are not
    # PrecomputeConfig fields, and one store serves every terminal.
    assert not {"terminal", "gamma", "shaping"} & set(PrecomputeConfig.__dataclass_fields__)


def test_cli_inspect_prints_the_implicit_values(train_models: dict[str, str], capsys: Any) -> None:
    from tvkd.cli import main

    teacher, reference = train_models["teacher"], train_models["student"]
    pair = PAIRS[1]
    base = ["inspect", "--teacher", teacher, "--prompt", pair.prompt, "--response", pair.chosen]
    implicit = [*base, "--q-source", "implicit", "--teacher-reference", reference, "--value-beta", "0.5"]
    assert main([*implicit, "--terminal", "pre_eos", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"]["q_source"] == "implicit" and data["method"]["terminal"] == "pre_eos"
    tok = load_tokenizer(teacher)
    tp = tokenize_pair(tok, pair, max_length=64)
    ids = tp.prompt_ids + tp.chosen_ids
    t64, r64 = load_causal_lm(teacher, dtype=torch.float64), load_causal_lm(reference, dtype=torch.float64)
    ratios = [
        a - b
        for a, b in zip(
            _token_logps64(t64, ids, len(tp.prompt_ids)),
            _token_logps64(r64, ids, len(tp.prompt_ids)),
            strict=True,
        )
    ]
    want = np.concatenate([[0.0], 0.5 * np.cumsum(ratios)])  # V(s_1 .. s_{T+1})
    got = [t["value"] for t in data["tokens"]]
    np.testing.assert_allclose(got, want[:-1], rtol=0, atol=ATOL)  # V(s_t) of each token
    # pre_eos: Σψ = V(s_T) − V(s_1) (γ = 1); value_end is still V(s_{T+1}).
    assert data["sum_psi"] == pytest.approx(want[-2], abs=ATOL)
    assert data["value_end"] == pytest.approx(want[-1], abs=ATOL)
    # The table shows the same per-token V.
    assert main([*implicit, "--signal", "value", "--no-color"]) == 0
    table = capsys.readouterr().out
    assert "V(s_t)" in table and f"{got[1]:+.4f}" in table  # the second token's V(s_2), 4 decimals
    # Without the reference: a usage error naming the flag.
    assert main([*base, "--q-source", "implicit"]) == 2
    assert "--teacher-reference" in capsys.readouterr().err


def test_cli_precompute_implicit(tmp_path: Path, train_models: dict[str, str], capsys: Any) -> None:
    from tvkd.cli import main

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["precompute", "--teacher", train_models["teacher"], "--data", str(data), "--max-length", "64",
            "--store-root", str(tmp_path / "values"), "--q-source", "implicit"]  # fmt: skip
    assert main(argv) == 1
    assert "teacher_reference" in capsys.readouterr().err
    assert main([*argv, "--teacher-reference", train_models["student"]]) == 0
    out = capsys.readouterr().out
    assert "cached:     no" in out and "teacher:    teacher shaping accuracy" in out
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("key:"))
    from tvkd.store import ValueStore

    store = ValueStore.open(tmp_path / "values" / key)
    assert (
        store.fields["q_source"] == "implicit"
        and store.fields["teacher_reference"] == train_models["student"]
    )
