"""tvkd.demo_world: the default demo's character tokenizer, small Llamas and task-world datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tvkd import taskworld as tw
from tvkd.data import PreferencePair
from tvkd.demo_world import (
    CHAR_VOCAB,
    CharModel,
    WorldData,
    build_char_model,
    build_char_tokenizer,
    n_parameters,
    write_world_data,
)
from tvkd.models import ModelError
from tvkd.scorers import gold_checker
from tvkd.tokenize import tokenize_pair


def test_the_tokenizer_is_one_token_per_character() -> None:
    tok = build_char_tokenizer()
    _, n_prompt = tw.sequence("a47+38=", "85")
    enc = tok("a47+38=")["input_ids"]
    assert enc[0] == tw.BOS and len(enc) == n_prompt  # BOS + one token per character, as taskworld
    assert tok.convert_ids_to_tokens(enc[1:]) == list("a47+38=")
    assert tok.decode(enc, skip_special_tokens=True) == "a47+38="
    pair = PreferencePair(prompt="s3142=", chosen="1234", rejected="4321", row=0)
    t = tokenize_pair(tok, pair, max_length=32)
    assert t.chosen_ids[-1] == tok.eos_token_id == tw.EOS and len(t.chosen_ids) == len("1234") + 1
    assert tok.decode([*t.prompt_ids, *t.chosen_ids], skip_special_tokens=True) == "s3142=1234"


def test_a_model_has_the_stated_shape_and_the_tokenizer(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = CharModel(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3)
    out = build_char_model(tmp_path / "m", shape)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(CHAR_VOCAB)
    assert sum(p.numel() for p in model.parameters()) == n_parameters(shape)
    again = AutoModelForCausalLM.from_pretrained(build_char_model(tmp_path / "m2", shape))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    assert AutoTokenizer.from_pretrained(out)("r=")["input_ids"] == [
        tw.BOS,
        CHAR_VOCAB.index("r"),
        CHAR_VOCAB.index("="),
    ]
    with pytest.raises(ModelError, match="not divisible"):
        build_char_model(
            tmp_path / "bad", CharModel(hidden_size=10, num_layers=1, num_heads=3, intermediate_size=8)
        )


def test_the_datasets_hold_the_splits_and_the_held_out_rows_declare_the_checker(tmp_path: Path) -> None:
    sizes = dict(teacher_sft=20, teacher_pref=5, student_sft=10, student_pref=4, dev=6, test=7)
    paths = write_world_data(tmp_path, WorldData(sizes=sizes, pairs_per_prompt=3))
    rows = {name: [json.loads(line) for line in p.read_text().splitlines()] for name, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == dict(
        teacher_sft=20, student_sft=10, teacher_pref=15, student_pref=12, dev=6, test=7
    )
    assert set(rows["teacher_sft"][0]) == {"prompt", "completion"}
    prompts = {name: {r["prompt"] for r in rs} for name, rs in rows.items()}
    assert not prompts["test"] & (prompts["dev"] | prompts["student_pref"] | prompts["teacher_sft"])
    for row in rows["test"]:
        check = gold_checker(row)
        assert check is not None and check(row, row["answer"]) and check(row, f" {row['answer']}\n")
        assert not check(row, row["rejected"])
        assert row["answer"] == tw.solve(row["prompt"])[0]
