"""What the generation evaluation adds to the evaluate stage, on the test-sized models.

A tiny student (2-layer Llama, random weights) trains plain DPO on the generated tasks of
`tvkd data generate`; the same job runs twice in one process, without and with the generation
evaluation (`gen_prompts` held-out prompts answered greedily before and after training,
`gen_max_new_tokens` at most, scored by the tasks' gold checker and a tiny reward model), and
the table gives each stage's wall time. The gen/* values of random models mean nothing; the
point is the cost.

    python bench/generation_eval.py              # 10 steps, 16 prompts × 16 tokens
    python bench/generation_eval.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python bench/generation_eval.py` from a checkout not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="2 steps, 2 prompts × 4 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.prompts, args.new_tokens = 2, 2, 4

    from tvkd.config import JobOptions, JobSpec, TrainConfig
    from tvkd.model_prep import build_tiny_model, build_tiny_reward_model
    from tvkd.run_job import run_job
    from tvkd.tasks import generate, split, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = build_tiny_model(root / "student", seed=0)
        rm = build_tiny_reward_model(root / "rm", seed=3)
        train, held = split(generate(200, seed=0), eval_count=20)
        write_jsonl(train + held, root / "tasks.jsonl")
        settings = {"alpha": 0.0, "max_steps": args.steps, "batch_size": 8, "max_length": 96}
        runs = {
            "off": JobOptions(),
            f"{args.prompts} prompts × {args.new_tokens} tokens, reward model": JobOptions(
                gen_prompts=args.prompts, gen_max_new_tokens=args.new_tokens, reward_model=str(rm)
            ),
        }
        print("| generation evaluation | train s | evaluate s | gen/gold_accuracy before → after |")
        print("|---|---|---|---|")
        for k, (name, options) in enumerate(runs.items()):
            spec = JobSpec(
                teacher=None,
                student=str(student),
                dataset=str(root / "tasks.jsonl"),
                train=TrainConfig.from_dict({**settings, "eval_fraction": 0.1}),
                output_dir=str(root / f"job{k}"),
                store_root=str(root / "stores"),
                options=options,
            )
            job = run_job(spec, resume=False)
            assert job.evaluation is not None
            gold = (
                job.evaluation.before_metrics.get("gen/gold_accuracy"),
                job.evaluation.metrics.get("gen/gold_accuracy"),
            )
            shown = "—" if gold[0] is None else f"{gold[0]:.2f} → {gold[1]:.2f}"
            print(f"| {name} | {job.timings['train']:.1f} | {job.timings['evaluate']:.1f} | {shown} |")


if __name__ == "__main__":
    main()
