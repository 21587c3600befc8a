"""Tests of the generation evaluation (tvkd.scorers, tvkd.generation, tvkd.answers) on tiny
models built offline (CPU): each scorer against a plain reference computation, greedy batching
against one prompt at a time, and a whole job whose evaluate stage answers held-out prompts of
the generated tasks before and after training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tvkd.answers import GENERATIONS_FILE, GOLD, REWARD, WIN_RATE, read_generations
from tvkd.artifacts import ArtifactError
from tvkd.data import PreferencePair
from tvkd.generation import greedy_answers
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.scorers import ImplicitReward, RewardModel, gold_checker, win
from tvkd.tasks import generate, split, write_jsonl
from tvkd.tokenize import tokenize_pair


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama sequence classifier (one label, random weights) with the tiny tokenizer."""
    from tvkd.model_prep import build_tiny_reward_model

    return str(build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm"))


def conv_pair(question: str) -> PreferencePair:
    return PreferencePair(0, "", "x", "y", ({"role": "user", "content": question},))


def test_gold_checker_declared_by_generated_tasks():
    example = generate(6, seed=1)[0]  # an "add" task
    row = example.to_row()
    check = gold_checker(row)
    assert check is not None
    assert check(row, example.answer) and check(row, f"The answer is {example.answer}.")
    assert not check(row, example.wrong)
    # Explicitly named, unknown, or not declared at all.
    assert gold_checker({**row, "checker": "tvkd.tasks"}) is check
    with pytest.raises(ValueError, match="checker: 'exec'"):
        gold_checker({**row, "checker": "exec"})
    assert gold_checker({"prompt": "p", "chosen": "a", "rejected": "b"}) is None
    assert gold_checker({**row, "family": "unknown"}) is None


def test_reward_model_scores_the_conversation_as_transformers_does(reward_model):
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel(reward_model)
    pair = conv_pair("What is 2 + 3?")
    text = rm.text(pair, "5")
    assert "<|im_start|>user" in text and text.endswith("5<|im_end|>\n")  # the template, answer last
    plain = AutoModelForSequenceClassification.from_pretrained(reward_model, dtype=torch.float64)
    tok = load_tokenizer(reward_model)
    scores = []
    for answer in ("5", "seven hundred", "5, I think"):
        enc = tok(rm.text(pair, answer), return_tensors="pt", add_special_tokens=False)
        assert (enc["input_ids"][0] == tok.bos_token_id).sum() == 1  # the template's BOS only
        want = plain(**enc).logits[0, 0].item()
        got = rm.score(pair, answer)
        assert got == pytest.approx(want, abs=1e-4)
        scores.append(got)
    assert len(set(scores)) == 3  # answers are told apart
    # Text-form prompts: prompt text then answer.
    assert rm.text(PreferencePair(0, "Q: 1+1=", "2", "3"), " 2") == "Q: 1+1= 2"
    rm.close()


def test_implicit_reward_is_the_teachers_log_ratio(train_models):
    teacher, reference = train_models["teacher"], train_models["student"]
    judge = ImplicitReward(teacher, reference, max_length=64)
    tok = load_tokenizer(teacher)
    models = [load_causal_lm(m, dtype=torch.float64) for m in (teacher, reference)]
    pair = conv_pair("Repeat the word 'apple' 2 times.")
    answers = ["apple apple", "apple apple apple", ""]
    got = judge.rewards([(pair, a) for a in answers], batch_size=2)
    # An empty chat answer is still an answer: the end-of-turn token alone.
    for answer, r in zip(answers, got, strict=True):
        tp = tokenize_pair(tok, PreferencePair(0, "", answer, answer, pair.prompt_messages), max_length=64)
        ids = torch.tensor(np.concatenate([tp.prompt_ids, tp.chosen_ids]))[None]
        p, n = len(tp.prompt_ids), len(tp.chosen_ids)
        sums = []
        for model in models:  # float64, full logits, one unpadded row
            logp = model(input_ids=ids).logits[0, p - 1 : p - 1 + n].log_softmax(-1)
            sums.append(logp.gather(-1, torch.tensor(tp.chosen_ids)[:, None]).sum().item())
        assert r == pytest.approx(sums[0] - sums[1], abs=1e-3)
    assert len(set(got)) == 3
    # An answer past max_length (64 teacher tokens) is not scored.
    assert judge.rewards([(PreferencePair(0, "Q: 1+1=", "2", "3"), " apple" * 80)]) == [None]
    assert [win(1.0, 2.0), win(2.0, 1.0), win(1.0, 1.0), win(None, 1.0), win(math.nan, 1.0)] == [
        1.0,
        0.0,
        0.5,
        None,
        None,
    ]
    judge.close()


def test_greedy_batches_answer_as_one_prompt_at_a_time(train_models):
    model = load_causal_lm(train_models["student"])
    tok = load_tokenizer(train_models["student"])
    prompts = [tok(q)["input_ids"] for q in ("Q: 1+1=", "Q: what is twelve plus thirty=", "Hi")]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and any(batched)


def test_generations_file_refuses_a_newer_version(tmp_path):
    path = tmp_path / GENERATIONS_FILE
    path.write_text(json.dumps({"version": 99, "generations": []}))
    with pytest.raises(ArtifactError, match="newer"):
        read_generations(path)


def test_job_scores_answers_before_and_after_training(train_models, reward_model, tmp_path):
    from tvkd.config import JobOptions, JobSpec, TrainConfig
    from tvkd.run_job import run_job

    train, held_out = split(generate(40, seed=2), eval_count=8)
    write_jsonl(train + held_out, tmp_path / "tasks.jsonl")
    options = JobOptions(gen_prompts=4, gen_max_new_tokens=8, reward_model=reward_model)
    spec = JobSpec(
        teacher=None,
        student=train_models["student"],
        dataset=str(tmp_path / "tasks.jsonl"),
        train=TrainConfig.from_dict(
            {"alpha": 0.0, "max_steps": 2, "batch_size": 8, "max_length": 96, "eval_fraction": 0.2}
        ),
        output_dir=str(tmp_path / "job"),
        store_root=str(tmp_path / "stores"),
        options=options,
    )
    job = run_job(spec)
    assert job.status == "completed" and job.evaluation is not None
    doc = read_generations(job.evaluation.generations_path)
    assert len(doc.generations) == 4 and doc.step == 2 and doc.max_new_tokens == 8
    assert doc.scorers["gold"] and doc.scorers["reward"] == "rm" and doc.scorers["teacher"] is None
    # Before: the untrained student's own greedy answers to the same prompts.
    student = load_causal_lm(train_models["student"])
    tok = load_tokenizer(train_models["student"])
    rm = RewardModel(reward_model)
    for g in doc.generations:
        pair = job.prepared.pairs[g.index]
        assert g.index in job.prepared.eval_idx and g.prompt == [dict(m) for m in pair.prompt_messages]
        prompt_ids = tokenize_pair(tok, pair, max_length=96).prompt_ids
        assert g.before.text == greedy_answers(student, tok, [prompt_ids], max_new_tokens=8)[0]
        for answer in (g.before, g.after):
            assert isinstance(answer.gold, bool) and answer.teacher_reward is None
            assert answer.reward == pytest.approx(rm.score(pair, answer.text), abs=1e-5)
        assert g.win is None
    for when, metrics in (("before", doc.before), ("after", doc.after)):
        answers = [getattr(g, when) for g in doc.generations]
        assert metrics[GOLD] == pytest.approx(sum(a.gold for a in answers) / 4)
        assert metrics[REWARD] == pytest.approx(sum(a.reward for a in answers) / 4)
    assert WIN_RATE not in doc.after  # no teacher reference
    # The job's metrics: the untrained student at step 0, the trained one with the held-out metrics.
    record = json.loads(Path(job.result_path).read_text())
    assert record["eval_metrics"][GOLD] == doc.after[GOLD] and "rewards/accuracies" in record["eval_metrics"]
    evals = [h for h in record["train"]["history"] if h["split"] == "eval"]
    assert evals[0] == {"step": 0, "split": "eval", **doc.before}


def test_teacher_reference_judges_before_against_after(train_models, tmp_path):
    """With a teacher and its reference, every answer gets the implicit reward and each prompt a
    win: after beats before by the teacher's ranking (the two 'students' here are two models)."""
    from tvkd.answers import TEACHER_REWARD
    from tvkd.batch import build_train_pairs
    from tvkd.generation import GenerationOptions, evaluate_generation

    tok = load_tokenizer(train_models["student"])
    pairs = [conv_pair(q) for q in ("What is 2 + 3?", "Sort 3, 1, 2.", "Spell 12.")]
    held_out, _ = build_train_pairs(pairs, range(3), tokenizer=tok, max_length=64)
    options = GenerationOptions(
        prompts=3,
        max_new_tokens=5,
        teacher=train_models["teacher"],
        teacher_reference=train_models["student"],
        max_length=64,
    )
    doc = evaluate_generation(
        tmp_path,
        options=options,
        after_model=load_causal_lm(train_models["teacher"]),
        before_model=lambda: load_causal_lm(train_models["student"]),
        tokenizer=tok,
        held_out=held_out,
        pairs=pairs,
        records={},
        step=1,
    )
    judge = ImplicitReward(train_models["teacher"], train_models["student"], max_length=64 + 20)
    for g, pair in zip(doc.generations, pairs, strict=True):
        want = judge.rewards([(pair, g.before.text), (pair, g.after.text)])
        assert [g.before.teacher_reward, g.after.teacher_reward] == pytest.approx(want, abs=1e-6)
        assert g.win == win(g.before.teacher_reward, g.after.teacher_reward)
        assert g.before.gold is None and g.before.reward is None  # no checker, no reward model
    assert doc.scorers == {"gold": None, "reward": None, "teacher": "implicit"}
    assert doc.after[WIN_RATE] == pytest.approx(sum(g.win for g in doc.generations) / 3)
    assert doc.before[TEACHER_REWARD] == pytest.approx(
        sum(g.before.teacher_reward for g in doc.generations) / 3
    )
    assert read_generations(tmp_path).after == doc.after
