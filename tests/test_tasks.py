"""The generated, verifiable preference task (tvkd.tasks) and `tvkd data generate`."""

from __future__ import annotations

import pytest

from tvkd.cli import main
from tvkd.data import load_pairs
from tvkd.tasks import FAMILIES, Example, check_answer, generate, read_examples, spell, split
from tvkd.tokenize import tokenize_pairs


def test_deterministic_distinct_and_balanced():
    a, b = generate(120, seed=3), generate(120, seed=3)
    assert a == b
    assert generate(120, seed=4) != a
    assert len({ex.question for ex in a}) == 120
    assert {ex.family for ex in a} == set(FAMILIES)
    assert all(sum(ex.family == f for ex in a) == 20 for f in FAMILIES)


def test_gold_checker_accepts_chosen_and_rejects_rejected():
    for ex in generate(300, seed=0):
        assert check_answer(ex, ex.answer), ex
        assert not check_answer(ex, ex.wrong), ex
        assert check_answer(ex, f"  {ex.answer.upper()}. "), ex  # case, spacing, final full stop


@pytest.mark.parametrize(
    ("family", "answer", "response", "ok"),
    [
        ("add", "54", "The answer is 54.", True),
        ("add", "54", "540", False),
        ("add", "54", "55", False),
        ("sort", "1, 2, 3", "1 2 3", True),
        ("sort", "1, 2, 3", "1, 3, 2", False),
        ("spell", "twenty-one", "Twenty one", True),
        ("spell", "twenty-one", "twenty-two", False),
        ("repeat", "cat cat", "cat cat cat", False),
    ],
)
def test_gold_checker_cases(family, answer, response, ok):
    assert check_answer(Example(family, "q", answer, "x"), response) is ok


def test_spell():
    assert [spell(n) for n in (0, 13, 40, 42, 100, 115, 999)] == [
        "zero", "thirteen", "forty", "forty-two", "one hundred", "one hundred fifteen",
        "nine hundred ninety-nine",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        spell(1000)


def test_split_and_bad_arguments():
    train, held = split(generate(10), eval_count=3)
    assert len(train) == 7 and len(held) == 3 and not {e.question for e in train} & {e.question for e in held}
    with pytest.raises(ValueError, match="eval_count"):
        split(generate(5), eval_count=5)
    with pytest.raises(ValueError, match="families"):
        generate(5, families=("add", "juggle"))


def test_generate_cli_writes_loadable_conversational_pairs(tmp_path, tiny_tokenizer, capsys):
    assert main(["data", "generate", str(tmp_path), "--n", "36", "--eval", "6", "--seed", "1"]) == 0
    assert "30 train and 6 held-out" in capsys.readouterr().out
    pairs, report = load_pairs(tmp_path / "train.jsonl")
    assert report.kept == 30 and report.dropped == 0
    assert all(p.conversational and p.prompt_messages[-1]["role"] == "user" for p in pairs)
    tokenized, _ = tokenize_pairs(tiny_tokenizer, pairs, max_length=256)
    assert len(tokenized) == 30
    held = list(read_examples(tmp_path / "eval.jsonl"))
    assert held == split(generate(36, seed=1), eval_count=6)[1]
    assert main(["data", "generate", str(tmp_path), "--n", "5", "--eval", "5"]) == 2
