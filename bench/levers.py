"""The speed levers of the TVKD training step, each on and off, side by side (CPU).

One `tvkd.trainer.Trainer` (tiny Llama, random weights, BPE trained on HH text, real HH pairs of
varied lengths, float32, α = 0.7 with a precomputed value store) times its own `train_step`
over the same 2·B pairs per optimizer step in each setting:

- plain: two micro-batches of B pairs (gradient accumulation), padded rows, eager decoder, the
  chunked fused head (`linear_logps`), no activation checkpointing;
- padding_free: each micro-batch's rows back to back in one row (TrainConfig.padding_free);
- torch.compile: the decoder compiled (TrainConfig.torch_compile; inductor; compile time is
  spent in the untimed warm-up and printed);
- fused head off: full logits of the response positions, float32 log-softmax, gather
  (`policy_logps(fused_head=False)`), i.e. the lever "chunked fused head" switched off;
- activation checkpointing on (TrainConfig.gradient_checkpointing);
- micro batch 2·B: one micro-batch of all 2·B pairs instead of two of B.

tests/test_speed_levers.py checks that each gives the plain path's log-probs and gradients.
The settings take turns step by step (the order rotating each repeat); the verdict is the
median of the paired ratios setting ÷ plain (same pairs, back to back). On a CPU, packing and
compilation mostly do not pay: sdpa on a CPU gets a dense block-diagonal mask over the packed
row, and the tiny model's time is in matmuls either way. bench/gpu.py measures them on a GPU.

    python bench/levers.py            # hidden 256, 4 layers, vocab 4096, 2 x 4 pairs per step
    python bench/levers.py --smoke    # seconds; checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_model_size,
    add_run_arguments,
    bench_parser,
    hh_corpus,
    markdown_table,
    median,
    spread,
    start,
)

import tvkd.trainer as trainer_module
from tvkd.batch import policy_logps
from tvkd.config import MethodConfig, PrecomputeConfig, TrainConfig
from tvkd.data import load_pairs
from tvkd.model_prep import build_tiny_model
from tvkd.modeling import set_activation_checkpointing
from tvkd.precompute import precompute_values

PLAIN = "plain (2 × B pairs accumulated, padded, eager, fused head)"


@contextlib.contextmanager
def unfused_head() -> Iterator[None]:
    """The trainer's step with the plain full-logits head instead of `linear_logps`."""
    original = trainer_module.policy_logps
    trainer_module.policy_logps = functools.partial(policy_logps, fused_head=False)
    try:
        yield
    finally:
        trainer_module.policy_logps = original


@contextlib.contextmanager
def _compile_backend(backend: str) -> Iterator[None]:
    """The trainer's `torch.compile(...)` with this backend."""
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--read", type=int, default=400, help="rows of the data file to read")
    add_model_size(p, vocab=4096, hidden=256, layers=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="B: pairs per micro-batch of the plain step")
    p.add_argument("--steps", type=int, default=3, help="distinct optimizer steps (2·B pairs each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('none': skip)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.read, args.vocab, args.hidden, args.layers, args.heads = 200, 512, 32, 1, 2
        args.max_length, args.batch_size, args.steps, args.repeats, args.warmup = 128, 2, 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = start(args, seed=0)
    all_pairs, _ = load_pairs(args.data, on_error="drop", limit=args.read)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            intermediate_size=4 * args.hidden,
            max_position_embeddings=max(512, args.max_length),
            corpus=hh_corpus(all_pairs),
        )
        student = build_tiny_model(work / "student", seed=0, **shape)
        teacher = build_tiny_model(work / "teacher", seed=1, **shape)
        store = precompute_values(
            teacher, all_pairs, PrecomputeConfig(max_length=args.max_length), store_root=work / "store"
        ).store
        config = TrainConfig(
            method=MethodConfig(alpha=0.7),
            batch_size=args.batch_size,
            grad_accum=2,
            max_steps=10**6,
            warmup_ratio=0.0,
            learning_rate=1e-6,
            max_length=args.max_length,
            eval_fraction=0.0,
            num_samples=0,
        )

        def make_trainer(cfg: TrainConfig, name: str) -> trainer_module.Trainer:
            t = trainer_module.Trainer(
                cfg,
                student=student,
                teacher=teacher,
                pairs=all_pairs,
                train_idx=range(len(all_pairs)),
                eval_idx=[],
                store=store,
                output_dir=work / name,
            )
            t.setup()
            return t

        trainer = make_trainer(config, "run")
        per_step = 2 * args.batch_size
        if len(trainer.train_set) < per_step * args.steps:
            print(f"only {len(trainer.train_set)} usable pairs; raise --read", file=sys.stderr)
            return 1
        steps = [trainer.train_set[k * per_step : (k + 1) * per_step] for k in range(args.steps)]
        tokens = [sum(p.tokens for p in s) for s in steps]
        model = trainer.model

        def setting(
            *, micro: int = args.batch_size, on: trainer_module.Trainer = trainer, **switches: Any
        ) -> Callable[[int], None]:
            def run(k: int) -> None:
                on.config.padding_free = switches.get("padding_free", False)
                checkpointing = switches.get("checkpointing", False)
                if checkpointing:
                    set_activation_checkpointing(model, True)
                ctx = unfused_head() if switches.get("unfused") else contextlib.nullcontext()
                try:
                    with ctx:
                        on.train_step([steps[k][i : i + micro] for i in range(0, per_step, micro)])
                finally:
                    if checkpointing:
                        set_activation_checkpointing(model, False)

            return run

        settings: dict[str, Callable[[int], None]] = {
            PLAIN: setting(),
            "padding_free (packed rows, no padding)": setting(padding_free=True),
            "fused head off (full logits of response positions)": setting(unfused=True),
            "activation checkpointing on": setting(checkpointing=True),
            f"micro batch {per_step} (one micro-batch, no accumulation)": setting(micro=per_step),
        }
        compile_seconds = None
        trainers = [trainer]
        if args.compile_backend != "none":
            # A trainer of its own (same student, same pairs): switching the other settings'
            # checkpointing on and off would invalidate the compiled graph's guards each time.
            backend = args.compile_backend
            with _compile_backend(backend):
                compiled = make_trainer(dataclasses.replace(config, torch_compile=True), "compiled")
            trainers.append(compiled)
            settings[f"torch.compile ({backend})"] = setting(on=compiled)
        times: dict[str, list[float]] = {name: [] for name in settings}
        for name, fn in settings.items():
            t0 = time.perf_counter()
            for w in range(args.warmup):
                fn(w % args.steps)
            if name.startswith("torch.compile"):
                compile_seconds = time.perf_counter() - t0
        names = list(settings)
        for r in range(args.repeats):
            for k in range(args.steps):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    t0 = clock()
                    settings[name](k)
                    times[name].append(clock() - t0)
        for t in trainers:
            t.cleanup()
        n_tokens = [tokens[k] for _ in range(args.repeats) for k in range(args.steps)]

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\n## Levers of the training step: {per_step} HH pairs per optimizer step "
        f"(≤{args.max_length} tokens/sequence, {sum(tokens) / len(tokens):.0f} tokens/step), "
        f"{params:.2f}M-parameter student, float32, {args.threads} threads, {args.clock} clock, "
        f"{args.steps} steps × {args.repeats} repeats\n"
    )
    rows = []
    for name, t in times.items():
        paired = median([a / b for a, b in zip(t, times[PLAIN], strict=True)])
        rows.append(
            [
                name,
                median(t) * 1e3,
                spread(t),
                f"{sum(n_tokens) / sum(t):,.0f}",
                f"{paired:.3f}",
            ]
        )
    print(markdown_table(["setting", "median step ms", "min–max ms", "tokens/s", "time ÷ plain"], rows))
    print(
        "\ntime ÷ plain: median of the paired ratios (the same pairs, back to back). "
        + (f"torch.compile warm-up (compilation): {compile_seconds:.0f} s." if compile_seconds else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
