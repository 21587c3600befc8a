"""A character-level, verifiable task world for the replication benchmark (bench/replicate.py).

Three procedural families, each with one correct procedure and one *wrong procedure* that a
model can learn just as easily:

| family | prompt | correct answer | wrong procedure |
|---|---|---|---|
| `add` | `a47+38=` | `85` | digit-wise sum without carries (`75`) |
| `sort` | `s31422=` | `12234` | sorted the wrong way (`43221`) |
| `reverse` | `rabcd=` | `dcba` | copied unchanged (`abcd`) |

Supervised demonstrations (`demos`) give the wrong procedure's answer with probability
`wrong_rate` (40% by default), so a model trained on them learns a mixture and greedy decoding
is right only part of the time; preference pairs (`pairs`) always prefer the correct answer, and
reject the wrong procedure's answer or a small corruption of the correct one. `check` is the
gold checker. Prompts of different splits (`World.split`) never overlap, so tuning on `dev`
never sees a `test` prompt. Everything is a pure function of the seed; no torch, no files.

Tokens are characters: ids 0..2 are PAD, BOS and EOS; a sequence is BOS + prompt + answer + EOS.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+="
VOCAB = ("<pad>", "<s>", "</s>", *CHARS)
VOCAB_SIZE = len(VOCAB)
_ID = {c: i for i, c in enumerate(VOCAB)}
FAMILIES = ("add", "sort", "reverse")
MAX_ANSWER = 6  # longest correct answer (a sort or reverse of 6 symbols); corruptions add one


def encode(text: str) -> list[int]:
    """Token ids of `text` (characters of CHARS only); ValueError names the first other one."""
    try:
        return [_ID[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the task world's vocabulary") from None


def decode(ids: Sequence[int]) -> str:
    """Text of token ids up to the first EOS (PAD and BOS dropped)."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


@dataclass(frozen=True)
class Task:
    family: str
    prompt: str  # e.g. "a47+38="
    answer: str  # the correct answer
    wrong: str  # the wrong procedure's answer (always different from `answer`)


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    kind: str  # "procedure" (the wrong procedure's answer) or "corruption"


def solve(prompt: str) -> tuple[str, str]:
    """(correct answer, wrong procedure's answer) of a prompt such as "a47+38=", "s3142=", "rabc="."""
    tag, body = prompt[:1], prompt[1:-1]
    if not prompt.endswith("=") or tag not in ("a", "s", "r") or not body:
        raise ValueError(f"not a task world prompt: {prompt!r}")
    if tag == "a":
        a, b = body.split("+")
        no_carry = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(2), b.zfill(2), strict=True))
        return str(int(a) + int(b)), str(int(no_carry))
    if tag == "s":
        return "".join(sorted(body)), "".join(sorted(body, reverse=True))
    return body[::-1], body


def _add(rng: random.Random) -> str:
    return f"a{rng.randint(10, 99)}+{rng.randint(10, 99)}="


def _sort(rng: random.Random) -> str:
    return "s" + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(4, 6))) + "="


def _reverse(rng: random.Random) -> str:
    return "r" + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 6))) + "="


_MAKERS: dict[str, Callable[[random.Random], str]] = {"add": _add, "sort": _sort, "reverse": _reverse}


def make_task(rng: random.Random, family: str | None = None) -> Task:
    """One task whose wrong procedure gives a different answer (others are redrawn)."""
    name = family or rng.choice(FAMILIES)
    if name not in _MAKERS:
        raise ValueError(f"family must be one of {FAMILIES}; got {name!r}")
    while True:
        prompt = _MAKERS[name](rng)
        answer, wrong = solve(prompt)
        if wrong != answer:
            return Task(name, prompt, answer, wrong)


def check(task: Task, response: str) -> bool:
    """Gold checker: the response is exactly the correct answer."""
    return response == task.answer


def corrupt(answer: str, rng: random.Random) -> str:
    """A small corruption of an answer (a changed, swapped, dropped or doubled symbol), never the answer."""
    alphabet = "0123456789" if answer.isdigit() else "abcdefgh"
    while True:
        s = list(answer)
        i = rng.randrange(len(s))
        op = rng.choice(("change", "swap", "drop", "double"))
        if op == "change":
            s[i] = rng.choice(alphabet)
        elif op == "swap" and len(s) > 1:
            j = min(i + 1, len(s) - 1) if i + 1 < len(s) else i - 1
            s[i], s[j] = s[j], s[i]
        elif op == "drop" and len(s) > 1:
            del s[i]
        else:
            s.insert(i, s[i])
        out = "".join(s)
        if out != answer:
            return out


@dataclass(frozen=True)
class World:
    """The task world's splits: disjoint prompt sets drawn from one seed.

    `teacher_sft` / `teacher_pref` build the teacher; `student_sft` initialises the student;
    `student_pref` are the prompts of the student's preference pairs; `dev` is for choosing
    settings; `test` is reported and never used to choose anything.
    """

    seed: int
    teacher_sft: tuple[Task, ...]
    teacher_pref: tuple[Task, ...]
    student_sft: tuple[Task, ...]
    student_pref: tuple[Task, ...]
    dev: tuple[Task, ...]
    test: tuple[Task, ...]

    def split(self, name: str) -> tuple[Task, ...]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        return getattr(self, name)


SPLITS = ("teacher_sft", "teacher_pref", "student_sft", "student_pref", "dev", "test")


def make_world(seed: int, sizes: dict[str, int]) -> World:
    """Draw every split's prompts (sizes by split name) without repeating a prompt anywhere."""
    missing = [s for s in SPLITS if s not in sizes]
    if missing:
        raise ValueError(f"sizes must name every split; missing {missing}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, tuple[Task, ...]] = {}
    for name in SPLITS:
        tasks: list[Task] = []
        tries = 0
        while len(tasks) < sizes[name]:
            tries += 1
            if tries > 50 * sizes[name] + 1000:
                raise ValueError(f"cannot draw {sizes[name]} distinct prompts for split {name!r}")
            task = make_task(rng)
            if task.prompt not in seen:
                seen.add(task.prompt)
                tasks.append(task)
        out[name] = tuple(tasks)
    return World(seed=seed, **out)


def demos(tasks: Sequence[Task], *, wrong_rate: float, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) demonstrations: the wrong procedure's answer with probability `wrong_rate`."""
    if not 0.0 <= wrong_rate <= 1.0:
        raise ValueError(f"wrong_rate must be in [0, 1]; got {wrong_rate}")
    rng = random.Random(seed)
    return [(t.prompt, t.wrong if rng.random() < wrong_rate else t.answer) for t in tasks]


def pairs(tasks: Sequence[Task], *, per_prompt: int, seed: int) -> list[Pair]:
    """`per_prompt` pairs per task, chosen = the correct answer; the first rejects the wrong
    procedure's answer, the others distinct corruptions of the correct answer."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1; got {per_prompt}")
    rng = random.Random(seed)
    out: list[Pair] = []
    for t in tasks:
        rejected = [t.wrong]
        while len(rejected) < per_prompt:
            c = corrupt(t.answer, rng)
            if c not in rejected or len(set(rejected)) >= 8:
                rejected.append(c)
        out.append(Pair(t.prompt, t.answer, rejected[0], "procedure"))
        out.extend(Pair(t.prompt, t.answer, r, "corruption") for r in rejected[1:])
    return out


def sequence(prompt: str, response: str | None = None) -> tuple[list[int], int]:
    """Token ids BOS + prompt (+ response + EOS) and the prompt's length in tokens (with BOS)."""
    ids = [BOS, *encode(prompt)]
    n_prompt = len(ids)
    if response is not None:
        ids += [*encode(response), EOS]
    return ids, n_prompt
