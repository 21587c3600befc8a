"""The replication benchmark's task world (tvkd.taskworld): answers, wrong procedures, splits, pairs."""

from __future__ import annotations

import random

import pytest

from tvkd import taskworld as tw

SIZES = dict(teacher_sft=300, teacher_pref=100, student_sft=200, student_pref=100, dev=80, test=120)


@pytest.mark.parametrize(
    ("prompt", "answer", "wrong"),
    [
        ("a47+38=", "85", "75"),  # no carry: 4+3, 7+8 → 7, 5
        ("a95+17=", "112", "2"),  # 9+1 → 0, 5+7 → 2: "02" read as a number
        ("s31422=", "12234", "43221"),
        ("rabcd=", "dcba", "abcd"),
    ],
)
def test_correct_and_wrong_procedures(prompt, answer, wrong):
    assert tw.solve(prompt) == (answer, wrong)
    task = tw.Task("x", prompt, answer, wrong)
    assert tw.check(task, answer) and not tw.check(task, wrong) and not tw.check(task, answer + " ")
    with pytest.raises(ValueError, match="not a task world prompt"):
        tw.solve("x12=")


def test_wrong_procedure_always_differs_and_families_all_appear():
    rng = random.Random(1)
    tasks = [tw.make_task(rng) for _ in range(600)]
    assert all(t.wrong != t.answer for t in tasks)
    assert {t.family for t in tasks} == set(tw.FAMILIES)
    assert all(len(t.answer) <= tw.MAX_ANSWER for t in tasks)


def test_world_is_deterministic_with_disjoint_splits():
    a, b = tw.make_world(3, SIZES), tw.make_world(3, SIZES)
    assert a == b and tw.make_world(4, SIZES) != a
    prompts = [t.prompt for s in tw.SPLITS for t in a.split(s)]
    assert len(prompts) == len(set(prompts)) == sum(SIZES.values())  # no prompt in two splits
    assert all(len(a.split(s)) == SIZES[s] for s in tw.SPLITS)
    with pytest.raises(ValueError, match="split must be one of"):
        a.split("train")
    with pytest.raises(ValueError, match="missing \\['test'\\]"):
        tw.make_world(0, {k: v for k, v in SIZES.items() if k != "test"})


def test_demos_carry_the_wrong_procedure_at_the_stated_rate():
    tasks = tw.make_world(0, SIZES).teacher_sft
    rows = tw.demos(tasks, wrong_rate=0.4, seed=5)
    wrong = sum(r == t.wrong for (_, r), t in zip(rows, tasks, strict=True))
    assert 0.33 < wrong / len(tasks) < 0.47  # 300 draws at p = 0.4: ±4 sd ≈ ±0.11 would be looser
    assert all(r in (t.answer, t.wrong) for (_, r), t in zip(rows, tasks, strict=True))
    assert tw.demos(tasks, wrong_rate=0.0, seed=5) == [(t.prompt, t.answer) for t in tasks]
    with pytest.raises(ValueError, match="wrong_rate"):
        tw.demos(tasks, wrong_rate=1.5, seed=0)


def test_pairs_prefer_the_correct_answer():
    tasks = tw.make_world(0, SIZES).student_pref
    pairs = tw.pairs(tasks, per_prompt=4, seed=0)
    assert len(pairs) == 4 * len(tasks)
    for i, t in enumerate(tasks):
        group = pairs[4 * i : 4 * i + 4]
        assert all(p.prompt == t.prompt and p.chosen == t.answer for p in group)
        assert group[0].rejected == t.wrong and group[0].kind == "procedure"
        assert all(p.kind == "corruption" and p.rejected != t.answer for p in group[1:])
    with pytest.raises(ValueError, match="per_prompt"):
        tw.pairs(tasks, per_prompt=0, seed=0)


def test_tokens_round_trip():
    ids, n_prompt = tw.sequence("a12+34=", "46")
    assert ids[0] == tw.BOS and ids[-1] == tw.EOS and n_prompt == 8
    assert tw.decode(ids[n_prompt:]) == "46"
    assert tw.decode([*tw.encode("dcba"), tw.EOS, *tw.encode("zz")]) == "dcba"
    with pytest.raises(ValueError, match="'A' is not in the task world's vocabulary"):
        tw.encode("aA")
