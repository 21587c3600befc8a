"""A generated, verifiable preference task: the demo's dataset, shipped as code.

Each example is a short instruction from one of several task families with a single correct
answer. chosen = the correct answer, rejected = a plausible wrong one (an off-by-one sum, a list
with two items swapped, a misspelt number, a word repeated once too often). The rows are
conversational (`prompt` is a list of chat messages), so they are rendered with each model's chat
template. Everything is a pure function of the seed. `check_answer` is the gold checker used to
score a model's free-form greedy answers.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("add", "subtract", "sort", "spell", "repeat", "compare")

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "tiger",
    "music",
    "paper",
    "light",
    "ocean",
    "bread",
    "happy",
    "chair",
    "smile",
    "train",
    "honey",
    "garden",
    "window",
    "planet",
    "silver",
    "forest",
    "candle",
    "rocket",
    "pencil",
    "marble",
    "violin",
    "summer",
    "winter",
    "yellow",
    "orange",
    "purple",
    "dragon",
    "castle",
    "bridge",
    "basket",
    "mirror",
    "button",
    "pillow",
    "kitten",
]


def spell(n: int) -> str:
    """English words for 0 ≤ n ≤ 999 ("one hundred twenty-three")."""
    if not 0 <= n <= 999:
        raise ValueError(f"spell() covers 0..999; got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {spell(rest)}" if rest else "")


@dataclass(frozen=True)
class Example:
    family: str
    question: str
    answer: str  # the canonical correct answer
    wrong: str  # a plausible wrong answer (the rejected response)

    def to_row(self) -> dict[str, object]:
        return {
            "prompt": [{"role": "user", "content": self.question}],
            "chosen": [{"role": "assistant", "content": self.answer}],
            "rejected": [{"role": "assistant", "content": self.wrong}],
            "family": self.family,
            "answer": self.answer,
        }


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    return Example("add", f"What is {a} + {b}? Answer with the number only.", str(a + b), str(wrong))


def _subtract(rng: random.Random) -> Example:
    a = rng.randint(10, 99)
    b = rng.randint(1, a - 1)
    wrong = a - b + rng.choice([-1, 1, 2])
    return Example("subtract", f"What is {a} - {b}? Answer with the number only.", str(a - b), str(wrong))


def _sort(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 60), rng.randint(3, 5))
    good = sorted(nums)
    bad = list(good)
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    q = f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."
    return Example("sort", q, ", ".join(map(str, good)), ", ".join(map(str, bad)))


def _spell(rng: random.Random) -> Example:
    n = rng.randint(11, 199)
    wrong = spell(n + rng.choice([-1, 1, 10]))
    return Example("spell", f"Write the number {n} in words.", spell(n), wrong)


def _repeat(rng: random.Random) -> Example:
    word, k = rng.choice(_WORDS), rng.randint(2, 5)
    wrong_k = k + rng.choice([-1, 1])
    q = f"Repeat the word '{word}' {k} times, separated by spaces."
    return Example("repeat", q, " ".join([word] * k), " ".join([word] * wrong_k))


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 100), 2)
    q = f"Which is larger, {a} or {b}? Answer with the number only."
    return Example("compare", q, str(max(a, b)), str(min(a, b)))


_MAKERS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "subtract": _subtract, "sort": _sort, "spell": _spell, "repeat": _repeat,
    "compare": _compare,
}  # fmt: skip


def generate(n: int, *, seed: int = 0, families: tuple[str, ...] = FAMILIES) -> list[Example]:
    """n distinct examples, families in turn, deterministic from `seed`."""
    unknown = set(families) - set(_MAKERS)
    if unknown:
        raise ValueError(f"families: unknown {sorted(unknown)}; choose from {FAMILIES}")
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        family = families[len(out) % len(families)]
        if attempts > 50 * n + 100:
            raise ValueError(f"n: cannot draw {n} distinct examples; family {family!r} ran out")
        ex = _MAKERS[family](rng)
        if ex.question in seen or ex.answer == ex.wrong:
            continue
        seen.add(ex.question)
        out.append(ex)
    return out


def split(examples: list[Example], *, eval_count: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the last `eval_count` examples are held out (generation is shuffled)."""
    if not 0 <= eval_count < len(examples):
        raise ValueError(f"eval_count must be in [0, {len(examples)}); got {eval_count}")
    return examples[: len(examples) - eval_count], examples[len(examples) - eval_count :]


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_row(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_examples(path: str | Path) -> Iterator[Example]:
    """Examples back from a file written by write_jsonl (the held-out prompts for gold scoring)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            yield Example(row["family"], row["prompt"][-1]["content"], row["answer"],
                          row["rejected"][-1]["content"])  # fmt: skip


def _normalise(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s,;]+", " ", text)
    return text.strip(" .!\"'")


def check_answer(example: Example, response: str) -> bool:
    """Gold checker for a free-form answer: is `response` the correct answer?

    Lenient about case, surrounding punctuation, separators and a leading "The answer is";
    strict about the content (a number off by one, a missorted list or a wrong count fails).
    """
    got = _normalise(response)
    got = re.sub(r"^(the )?(answer|result)( is)?:? ", "", got)
    want = _normalise(example.answer)
    if example.family in ("add", "subtract", "compare"):
        m = re.match(r"-?\d+", got)
        return m is not None and m.group(0) == want
    if example.family == "spell":
        return got.replace("-", " ") == want.replace("-", " ")
    return got == want
