"""Generation evaluation, a step of the evaluate stage: the student's greedy answers to held-out
prompts before and after training, scored (`tvkd.scorers`) and written to generations.json
(`tvkd.answers`).

The prompts are the first `prompts` held-out pairs as training tokenized them (the student's
chat template), answered greedily, `max_new_tokens` at most, by the student folder before
training and by the trained model folder. Metrics (means over the prompts a scorer could score):

- `gen/gold_accuracy`: share of answers the dataset's gold checker accepts (rows that declare a
  checker only; absent when none does);
- `gen/reward`: the reward model's mean score (with `reward_model`);
- `gen/teacher_reward`: the teacher's mean implicit reward, and `gen/win_rate`: the share of
  prompts whose answer after training the teacher ranks above the one before (ties count ½),
  both with `teacher_reference`.

The `before` metrics describe the untrained student (reported at step 0), the `after` metrics
and the win rate the trained one (reported at the last step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from tvkd.answers import (
    GENERATIONS_FILE,
    GOLD,
    REWARD,
    TEACHER_REWARD,
    WHEN,
    WIN_RATE,
    Answer,
    Generation,
    GenerationsFile,
    write_generations,
)
from tvkd.batch import TrainPair
from tvkd.config import JobSpec
from tvkd.data import PreferencePair
from tvkd.modeling import pad_token_id
from tvkd.scorers import Checker, ImplicitReward, RewardModel, gold_checker, win


@dataclass(frozen=True)
class GenerationOptions:
    """What the generation evaluation does (the job's `gen_*`, `reward_model` and
    `teacher_reference` options; MATH.md has no part in it). `prompts` 0 turns it off."""

    prompts: int = 0
    max_new_tokens: int = 64
    reward_model: str | None = None
    teacher: str | None = None
    teacher_reference: str | None = None
    max_length: int = 1024  # the job's max_length: the teacher judges prompt + answer within it
    batch_size: int = 8

    @property
    def enabled(self) -> bool:
        return self.prompts > 0


def generation_options(spec: JobSpec) -> GenerationOptions:
    """The generation evaluation the job's options ask for (`tvkd.generation`)."""
    options = spec.options
    return GenerationOptions(
        prompts=options.gen_prompts,
        max_new_tokens=options.gen_max_new_tokens,
        reward_model=options.reward_model,
        teacher=spec.teacher,
        teacher_reference=options.teacher_reference,
        max_length=spec.train.max_length,
        batch_size=spec.train.batch_size,
    )


def held_out_records(
    spec: JobSpec, pairs: Sequence[PreferencePair], eval_idx: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """The source row of each held-out pair, by pair index: where a row declares its gold checker
    (`tvkd.scorers.gold_checker`). Read from `eval_dataset` when the job has one."""
    from tvkd.sources import read_source

    options = spec.options
    raw = read_source(options.eval_dataset or spec.dataset, "train", options.limit)
    rows = {row: record for row, record in raw.records if isinstance(record, dict)}
    return {i: rows[pairs[i].row] for i in eval_idx if pairs[i].row in rows}


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy continuations of the token-id prompts (left-padded batches), decoded without
    special tokens and stripped; generation stops at the tokenizer's or the model's EOS."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = [
        i
        for i in {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
        if i is not None
    ]
    eos = [j for i in eos for j in (i if isinstance(i, list) else [i])]
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for k in range(0, len(prompts), batch_size):
            chunk = [list(map(int, p)) for p in prompts[k : k + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos or None,
            )
            answers += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers


def _mean(values: Sequence[float | bool | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return fmean(kept) if kept else None


def _metrics(answers: Sequence[Answer]) -> dict[str, float]:
    out = {
        GOLD: _mean([a.gold for a in answers]),
        REWARD: _mean([a.reward for a in answers]),
        TEACHER_REWARD: _mean([a.teacher_reward for a in answers]),
    }
    return {k: v for k, v in out.items() if v is not None}


def evaluate_generation(
    output_dir: str | os.PathLike[str],
    *,
    options: GenerationOptions,
    after_model: Any,
    before_model: Any,
    tokenizer: Any,
    held_out: Sequence[TrainPair],
    pairs: Sequence[PreferencePair],
    records: Mapping[int, Mapping[str, Any]],
    step: int,
    device: str | torch.device = "cpu",
) -> GenerationsFile:
    """Answer, score and write `output_dir/generations.json` (see the module doc).

    `held_out`: the tokenized held-out pairs (the first `options.prompts` are asked);
    `records`: the source row of each pair, by pair index (where a row declares its checker);
    `before_model`: a callable returning the untrained student (loaded only when needed),
    `after_model` the trained one. Raises `tvkd.models.ModelError` when a scorer's folder cannot
    be loaded, ValueError when a row names an unknown checker.
    """
    asked = list(held_out[: options.prompts])
    prompts = [e.prompt_ids for e in asked]
    kw = {"max_new_tokens": options.max_new_tokens, "batch_size": options.batch_size}
    texts = {"after": greedy_answers(after_model, tokenizer, prompts, **kw)}
    model = before_model()
    texts["before"] = greedy_answers(model, tokenizer, prompts, **kw)
    del model
    answers = {when: [Answer(t) for t in texts[when]] for when in WHEN}
    checkers: list[Checker | None] = [gold_checker(records.get(e.index, {})) for e in asked]
    for when in WHEN:
        for answer, check, e in zip(answers[when], checkers, asked, strict=True):
            answer.gold = check(records[e.index], answer.text) if check is not None else None
    scorers: dict[str, str | None] = {
        "gold": "declared by the dataset" if any(checkers) else None,
        "reward": Path(options.reward_model).name if options.reward_model else None,
        "teacher": "implicit" if options.teacher and options.teacher_reference else None,
    }
    if options.reward_model:
        rm = RewardModel(options.reward_model, device=device)
        for when in WHEN:
            for answer, e in zip(answers[when], asked, strict=True):
                answer.reward = rm.score(pairs[e.index], answer.text)
        rm.close()
    wins: list[float | None] = [None] * len(asked)
    if options.teacher and options.teacher_reference:
        max_length = options.max_length + 4 * options.max_new_tokens  # teacher tokens of prompt + answer
        judge = ImplicitReward(
            options.teacher, options.teacher_reference, max_length=max_length, device=device
        )
        for when in WHEN:
            rewards = judge.rewards(
                [(pairs[e.index], a.text) for e, a in zip(asked, answers[when], strict=True)]
            )
            for answer, r in zip(answers[when], rewards, strict=True):
                answer.teacher_reward = r
        judge.close()
        wins = [
            win(b.teacher_reward, a.teacher_reward)
            for b, a in zip(answers["before"], answers["after"], strict=True)
        ]
    after = _metrics(answers["after"])
    win_rate = _mean(wins)
    if win_rate is not None:
        after[WIN_RATE] = win_rate
    doc = GenerationsFile(
        generations=[
            Generation(
                index=e.index,
                row=e.row,
                prompt=_prompt(pairs[e.index]),
                before=answers["before"][j],
                after=answers["after"][j],
                win=wins[j],
            )
            for j, e in enumerate(asked)
        ],
        step=step,
        max_new_tokens=options.max_new_tokens,
        scorers=scorers,
        before=_metrics(answers["before"]),
        after=after,
    )
    write_generations(Path(output_dir) / GENERATIONS_FILE, doc)
    return doc


def _prompt(pair: PreferencePair) -> str | list[dict[str, Any]]:
    return [dict(m) for m in pair.prompt_messages] if pair.prompt_messages else pair.prompt
