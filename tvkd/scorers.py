"""Scorers of free-form answers: the evaluate stage's generation evaluation (`tvkd.generation`).

Three independent judges of a student's greedy answer `y` to a held-out prompt `x`:

- **Gold checker** (`gold_checker`): a function the dataset declares. A row declares one by a
  `checker` column naming a registered checker (`CHECKERS`), or, as the generated tasks of
  `tvkd data generate` do, by carrying `family` (one of `tvkd.tasks.FAMILIES`) and `answer`:
  then `tvkd.tasks.check_answer` decides. Checkers are looked up by name, never imported from
  data.
- **Reward model** (`RewardModel`): any Hugging Face sequence-classification folder. The
  reward of (x, y) is its logit when it has one label, else the log-probability of its last
  label; the text is the reward model's chat template over the prompt's messages plus the
  answer when it has a template and the prompt is conversational, else prompt text + answer.
- **Teacher's implicit reward** (`ImplicitReward`): r(x, y) = Σ_t log π_φ(y_t | x, y_<t) −
  Σ_t log π_φref(y_t | x, y_<t), the DPO reward of the teacher φ against its reference φref up
  to the factor β (MATH.md, `q_source = "implicit"`), on the teacher's tokens of (x, y).
  `win` compares two answers by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tvkd import tasks
from tvkd.batch import build_train_pairs, collate, policy_logps
from tvkd.data import PreferencePair
from tvkd.modeling import model_device, pad_token_id

Checker = Callable[[Mapping[str, Any], str], bool]


def _tasks_checker(record: Mapping[str, Any], response: str) -> bool:
    prompt = record.get("prompt")
    question = prompt[-1]["content"] if isinstance(prompt, list) and prompt else str(prompt or "")
    example = tasks.Example(str(record["family"]), question, str(record["answer"]), "")
    return tasks.check_answer(example, response)


def _taskworld_checker(record: Mapping[str, Any], response: str) -> bool:
    # The held-out rows of tvkd.demo_world: exactly the correct answer (tvkd.taskworld.check).
    return response.strip() == str(record["answer"])


CHECKERS: dict[str, Checker] = {"tvkd.tasks": _tasks_checker, "tvkd.taskworld": _taskworld_checker}


def gold_checker(record: Mapping[str, Any]) -> Checker | None:
    """The checker a dataset row declares (see the module doc), or None when it declares none.

    Raises ValueError naming the checker when the row names one that is not registered."""
    name = record.get("checker")
    if name is None and record.get("family") in tasks.FAMILIES and "answer" in record:
        name = "tvkd.tasks"
    if name is None:
        return None
    if name not in CHECKERS:
        raise ValueError(f"checker: {name!r} is not a known checker (known: {sorted(CHECKERS)})")
    return CHECKERS[str(name)]


def _messages(pair: PreferencePair, answer: str) -> list[dict[str, Any]]:
    return [*(dict(m) for m in pair.prompt_messages or ()), {"role": "assistant", "content": answer}]


class RewardModel:
    """A sequence-classification reward model loaded from a local folder (safetensors only).

    Raises `tvkd.models.ModelError` when the folder cannot be loaded."""

    def __init__(self, path: str, *, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification

        from tvkd.models import ModelError, check_safetensors_folder, load_tokenizer, resolve_model_path

        folder = resolve_model_path(path)  # a local folder: no hub download
        check_safetensors_folder(Path(folder))
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=torch.float32, use_safetensors=True
            ).to(device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a sequence-classification model folder ({exc})") from exc
        self.model.eval()
        self.tokenizer = load_tokenizer(folder)
        self.path = path

    def templated(self, pair: PreferencePair) -> bool:
        return pair.conversational and bool(getattr(self.tokenizer, "chat_template", None))

    def text(self, pair: PreferencePair, answer: str) -> str:
        """What the reward model reads: the conversation with the answer as the last turn."""
        if self.templated(pair):
            return str(self.tokenizer.apply_chat_template(_messages(pair, answer), tokenize=False))
        return pair.prompt + answer

    @torch.no_grad()
    def score(self, pair: PreferencePair, answer: str) -> float:
        """The reward of `answer` to `pair`'s prompt (one sequence, no padding)."""
        # A chat template writes its own special tokens (BOS included).
        special = not self.templated(pair)
        enc = self.tokenizer(
            self.text(pair, answer), return_tensors="pt", truncation=True, add_special_tokens=special
        )
        logits = self.model(**enc.to(model_device(self.model))).logits[0].float()
        if logits.numel() == 1:
            return float(logits[0])
        return float(logits.log_softmax(-1)[-1])

    def close(self) -> None:
        del self.model


class ImplicitReward:
    """The teacher's implicit DPO reward of answers (see the module doc), teacher and reference
    loaded once; `max_length` bounds prompt + answer in teacher tokens.

    Raises `tvkd.models.ModelError` when a folder cannot be loaded; ValueError when the two
    models do not share a tokenizer vocabulary."""

    def __init__(
        self, teacher: str, reference: str, *, max_length: int, device: str | torch.device = "cpu"
    ) -> None:
        from tvkd.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(teacher)
        self.teacher = load_causal_lm(teacher, dtype=torch.float32, device=device)
        self.reference = load_causal_lm(reference, dtype=torch.float32, device=device)
        if self.teacher.config.vocab_size != self.reference.config.vocab_size:
            raise ValueError(
                f"teacher_reference: {reference} has another vocabulary ({self.reference.config.vocab_size} "
                f"tokens) than the teacher {teacher} ({self.teacher.config.vocab_size})"
            )
        self.max_length = max_length
        self.device = torch.device(device)

    @torch.no_grad()
    def rewards(
        self, answers: Sequence[tuple[PreferencePair, str]], *, batch_size: int = 8
    ) -> list[float | None]:
        """r(x, y) of each (pair whose prompt is x, answer y), the answer's end-of-turn/EOS token
        included (so an empty answer is scored too); None for prompt + answer past `max_length`
        teacher tokens, or one the teacher's tokenizer cannot take."""
        # Each answer as both sides of a pair: the batching of training, one row per answer.
        pairs = [PreferencePair(p.row, p.prompt, y, y, p.prompt_messages, p.tools) for p, y in answers]
        kept, _ = build_train_pairs(
            pairs, range(len(pairs)), tokenizer=self.tokenizer, max_length=self.max_length
        )
        out: list[float | None] = [None] * len(pairs)
        pad = pad_token_id(self.tokenizer)
        for k in range(0, len(kept), batch_size):
            batch = collate(kept[k : k + batch_size], pad, self.device)
            mask = batch.split(batch.response_mask)[0].double()
            teacher = (policy_logps(self.teacher, batch)[0].double() * mask).sum(-1)
            reference = (policy_logps(self.reference, batch)[0].double() * mask).sum(-1)
            for e, r in zip(batch.pairs, (teacher - reference).tolist(), strict=True):
                out[e.index] = float(r)
        return out

    def close(self) -> None:
        del self.teacher, self.reference


def win(first: float | None, second: float | None) -> float | None:
    """1 when `second` scores above `first`, 0 below, 0.5 on a tie; None when either is unscored."""
    if first is None or second is None or math.isnan(first) or math.isnan(second):
        return None
    return 0.5 if first == second else float(second > first)
