"""Training-step time of TVKD against DPO (same trainer step) and against TRL's DPOTrainer.

All steps run on the same tiny Llama (random weights, BPE trained on HH text), the same
batches of real HH pairs (same effective batch: B pairs, one micro-batch, one optimizer step),
the same threads, no gradient checkpointing, dropout off, each a full optimizer step (forward,
backward, gradient clipping, AdamW, LR scheduler):

- TVKD: `tvkd.trainer.Trainer.train_step` with α = 0.7 (ψ from a precomputed value store),
  float32 (the trainer's default), and the same call under bf16 autocast (`bf16=True`);
- DPO:  the very same `train_step` call with α = 0 and shaping "none": identical code, only ψ
  differs (target: TVKD ÷ DPO ≤ 1.05);
- TRL:  `trl.DPOTrainer.training_step` + clipping + optimizer + scheduler, as its training loop
  runs them, in each single-process setting: a reference forward every step (its default),
  `precompute_ref_log_probs=True` (reference log-probs once, before training, as TVKD does) in
  float32 and in TRL's default bf16, and `padding_free=True` where the installed TRL runs it
  (trl 1.16 warns and falls back to padding, so that row is reported as not run). The target
  is TVKD ÷ TRL's best setting (the lowest median step) ≤ 0.8.

Collation is excluded from every timing: each batch is collated once up front (TVKD's
`collate` is served from that cache, TRL gets its collated dict). The methods take turns
batch by batch (the order rotates each repeat), so slow drift of the machine hits all alike.
Reported: median step time over (batches × repeats), tokens/s = real tokens (one count per
batch, the same for every method) ÷ summed time, and the median of the paired ratios (two
methods' steps on the same batch, back to back), which cancels slowdowns of the whole machine;
the targets are judged on it. A microbenchmark of the loss call alone (`tvkd_loss` forward +
backward, the only code where TVKD and DPO differ) shows what ψ itself costs.

    python bench/step_time.py                      # defaults: hidden 256, 4 layers, vocab 4096,
                                                   # 4 pairs/step, sequences up to 256 tokens
    python bench/step_time.py --smoke              # seconds; checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    select_by_length,
    spread,
    start,
)

import tvkd.trainer as trainer_module
from tvkd.config import MethodConfig, PrecomputeConfig, TrainConfig
from tvkd.data import PreferencePair, load_pairs
from tvkd.losses import tvkd_loss
from tvkd.model_prep import build_tiny_model
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.precompute import precompute_values

TVKD, DPO = "TVKD (α=0.7)", "DPO (same step, α=0)"
TVKD_BF16 = "TVKD (α=0.7), bf16"
TRL_EVERY = "TRL DPOTrainer, ref forward every step"
TRL_PRE = "TRL DPOTrainer, precompute_ref_log_probs"
TRL_PRE_BF16 = "TRL DPOTrainer, precompute_ref_log_probs, bf16"
TRL_PADFREE = "TRL DPOTrainer, precompute_ref_log_probs, padding_free"


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds.append(seconds)
        self.tokens.append(tokens)

    @property
    def median_ms(self) -> float:
        return median(self.seconds) * 1e3

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)


@contextlib.contextmanager
def precollated(cache: dict[int, Any]) -> Iterator[None]:
    """Serve the trainer's `collate` (`tvkd.batch.collate`, as `tvkd.trainer` imports it) from
    `cache` (keyed by the micro-batch list's id), so the timed step is the trainer's own code
    minus collation, as TRL's is minus its collator."""
    original = trainer_module.collate

    def cached(examples: Any, pad_id: int, device: Any = "cpu") -> Any:
        hit = cache.get(id(examples))
        return hit if hit is not None else original(examples, pad_id, device)

    trainer_module.collate = cached
    try:
        yield
    finally:
        trainer_module.collate = original


def build_models(work: Path, pairs: list[PreferencePair], args: argparse.Namespace) -> tuple[Path, Path]:
    """Student and teacher: same shape and same BPE (trained on HH text), other random weights."""
    corpus = hh_corpus(pairs)
    shape = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.max_length),
        corpus=corpus,
    )
    student = build_tiny_model(work / "student", seed=0, **shape)
    teacher = build_tiny_model(work / "teacher", seed=1, **shape)
    return student, teacher


@dataclass(frozen=True)
class TrlSetting:
    """One configuration of TRL's DPOTrainer, timed as a method of its own."""

    name: str
    precompute_ref: bool  # `precompute_ref_log_probs`: reference log-probs once, before training
    bf16: bool  # TRL's default mixed precision (bf16 autocast through accelerate)
    padding_free: bool = False


TRL_SETTINGS = (
    TrlSetting(TRL_EVERY, precompute_ref=False, bf16=False),
    TrlSetting(TRL_PRE, precompute_ref=True, bf16=False),
    TrlSetting(TRL_PRE_BF16, precompute_ref=True, bf16=True),
    TrlSetting(TRL_PADFREE, precompute_ref=True, bf16=False, padding_free=True),
)


def make_trl_step(
    student: Path, pairs: list[PreferencePair], args: argparse.Namespace, work: Path, setting: TrlSetting
) -> tuple[Callable[[dict[str, Any]], None] | None, list[dict[str, Any]], str]:
    """A DPOTrainer in `setting` on the same model folder and pairs.

    Returns (step(inputs), collated batches, note); step is None when TRL does not run the
    setting (the note says why). With `precompute_ref_log_probs` TRL's own pre-pass (in its
    constructor) fills the reference log-probs, which its collator then carries in each batch.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=setting.bf16,
        gradient_checkpointing=False,  # TRL's default is on; TVKD's trainer runs without
        disable_dropout=True,
        precompute_ref_log_probs=setting.precompute_ref,
        padding_free=setting.padding_free,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        dataloader_num_workers=0,
        seed=0,
    )
    data = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    model = load_causal_lm(str(student), dtype=torch.float32)
    tokenizer = load_tokenizer(str(student))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if setting.padding_free and not trainer.padding_free:
        note = f"padding_free: not run, trl {_trl_version()} DPOTrainer warns and falls back to padding"
        return None, [], note
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    # Set by HF Trainer's training loop, which we do not run: one micro-batch per optimizer step.
    trainer.current_gradient_accumulation_steps = 1
    keys = ["prompt_ids", "chosen_ids", "rejected_ids"]
    if setting.precompute_ref:
        keys += ["ref_chosen_logps", "ref_rejected_logps"]
    batches = []
    for k in range(args.batches):
        rows = [trainer.train_dataset[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)]
        missing = [key for key in keys if key not in rows[0]]
        if missing:
            raise RuntimeError(f"{setting.name}: TRL's dataset lacks {missing}")
        batches.append(trainer.data_collator([{key: r[key] for key in keys} for r in rows]))
    # The training loop's `accelerator.prepare` is what puts the forward under bf16 autocast.
    model = trainer.accelerator.prepare_model(trainer.model)
    model.train()
    amp = "bf16 autocast" if setting.bf16 and trainer.accelerator.native_amp else "float32"
    note = f"{setting.name}: {amp}, precompute_ref_log_probs={setting.precompute_ref}"

    def step(inputs: dict[str, Any]) -> None:
        trainer.training_step(model, inputs)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, batches, note


def _trl_version() -> str:
    import trl

    return trl.__version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--read", type=int, default=2312, help="rows of the data file to read")
    add_model_size(p, vocab=4096, hidden=256, layers=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + response in tokens")
    p.add_argument("--min-length", type=int, default=None, help="shortest longer side (default 3/4 of max)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, each timed --repeats times")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument(
        "--bf16-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time TVKD and TRL (precomputed ref) under bf16 autocast, TRL's default precision",
    )
    p.add_argument("--work-dir", default=None, help="keep models/store here (default: a temp dir)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.read, args.vocab, args.hidden, args.layers, args.heads = 300, 512, 32, 1, 2
        args.intermediate, args.max_length, args.batch_size = 64, 128, 2
        args.batches, args.repeats, args.warmup = 1, 1, 1
    if args.min_length is None:
        args.min_length = 3 * args.max_length // 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = start(args, seed=0)
    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e '.[dev]'): the TRL row is skipped")
        args.skip_trl = True
    t_setup = time.perf_counter()
    all_pairs, _ = load_pairs(args.data, on_error="drop", limit=args.read)
    with contextlib.ExitStack() as stack:
        work = (
            Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        work.mkdir(parents=True, exist_ok=True)
        student, teacher = build_models(work, all_pairs, args)
        tokenizer = load_tokenizer(str(student))
        n = args.batch_size * args.batches
        pairs = select_by_length(
            tokenizer, all_pairs, max_length=args.max_length, min_length=args.min_length, count=n
        )
        if len(pairs) < n:
            print(
                f"only {len(pairs)} of {n} pairs fit {args.min_length}..{args.max_length} tokens",
                file=sys.stderr,
            )
            return 1
        pre = PrecomputeConfig(max_length=args.max_length)
        store = precompute_values(teacher, pairs, pre, store_root=work / "store").store
        config = TrainConfig(
            method=MethodConfig(alpha=0.7),
            batch_size=args.batch_size,
            max_steps=10**6,  # the schedule never ends here; warm-up 0 keeps the LR flat
            warmup_ratio=0.0,
            learning_rate=1e-6,
            max_length=args.max_length,
            eval_fraction=0.0,
            num_samples=0,
        )
        trainer = trainer_module.Trainer(
            config,
            student=student,
            teacher=teacher,
            pairs=pairs,
            train_idx=range(len(pairs)),
            eval_idx=[],
            store=store,
            output_dir=work / "run",
        )
        trainer.setup()  # includes the one-off reference pass, which is not part of a step
        ours = [
            trainer.train_set[k * args.batch_size : (k + 1) * args.batch_size] for k in range(args.batches)
        ]
        cache = {id(b): trainer_module.collate(b, trainer.pad_id, trainer.device) for b in ours}
        tokens = {id(b): cache[id(b)].tokens for b in ours}
        tvkd_opts = dict(trainer.loss_options)
        dpo_opts = {**tvkd_opts, "alpha": 0.0, "shaping": "none"}

        def ours_step(opts: dict[str, Any], bf16: bool = False) -> Callable[[int], int]:
            def run(k: int) -> int:
                trainer.loss_options = opts
                trainer.config.bf16 = bf16  # read by the trainer's autocast at each step
                trainer.train_step([ours[k]])
                return tokens[id(ours[k])]

            return run

        methods: dict[str, Callable[[int], int]] = {TVKD: ours_step(tvkd_opts), DPO: ours_step(dpo_opts)}
        if args.bf16_rows:
            methods[TVKD_BF16] = ours_step(tvkd_opts, bf16=True)
        notes: list[str] = []
        if not args.skip_trl:
            for setting in TRL_SETTINGS:
                if setting.bf16 and not args.bf16_rows:
                    continue
                trl_step, trl_batches, note = make_trl_step(student, pairs, args, work, setting)
                notes.append(note)
                if trl_step is not None:
                    methods[setting.name] = trl_runner(trl_step, trl_batches, ours, tokens)
        print(
            f"setup {time.perf_counter() - t_setup:.1f} s: {len(pairs)} HH pairs, "
            f"{sum(tokens.values()) / args.batches:.0f} tokens/batch, "
            f"student {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters"
        )
        for note in notes:
            print(f"  {note}")

        times = {name: Timings() for name in methods}
        with precollated(cache):
            for fn in methods.values():  # warm-up: allocator, thread pools, first-call paths
                for k in itertools.islice(itertools.cycle(range(args.batches)), args.warmup):
                    fn(k)
            names = list(methods)
            for r in range(args.repeats):
                for k in range(args.batches):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        t0 = clock()
                        count = methods[name](k)
                        times[name].add(clock() - t0, count)
            psi_ms = loss_only_ms(cache[id(ours[0])], {TVKD: tvkd_opts, DPO: dpo_opts})
        trainer.cleanup()

    print(
        f"\n## Step time: {args.batch_size} pairs/step, ≤{args.max_length} tokens/sequence, "
        f"{args.threads} threads, {args.clock} clock, float32 unless marked bf16, "
        f"{args.batches} batches × {args.repeats} repeats\n"
    )
    print(report(times, psi_ms))
    print(
        "\ntokens/s: real (unpadded) tokens of the batches, the same count for every method, ÷ the summed "
        "step time. paired ratio: the methods run back to back on the same batch, so their ratio cancels "
        "machine-wide slowdowns; the verdicts use it. TRL's best: its setting with the lowest median step."
    )
    return 0


def trl_runner(
    step: Callable[[dict[str, Any]], None],
    batches: list[dict[str, Any]],
    ours: list[Any],
    tokens: dict[int, int],
) -> Callable[[int], int]:
    """Batch k of TRL's collated batches, counted with TVKD's token count of the same pairs."""

    def run(k: int) -> int:
        step(batches[k])
        return tokens[id(ours[k])]

    return run


def report(times: dict[str, Timings], psi_ms: dict[str, float]) -> str:
    """The step table and the ratios table (TVKD against DPO and against each TRL setting)."""
    base = times[TVKD].median_ms
    rows = [
        [name, t.median_ms, spread(t.seconds), f"{t.tokens_per_s:,.0f}", f"{t.median_ms / base:.3f}"]
        for name, t in times.items()
    ]
    out = markdown_table(["method", "median step ms", "min–max ms", "tokens/s", "time ÷ TVKD"], rows)
    ratios = [
        ["TVKD ÷ DPO step, ratio of medians", f"{base / times[DPO].median_ms:.3f}", "≤ 1.05", ""],
        _paired_row("TVKD ÷ DPO step, median of paired ratios", times[TVKD], times[DPO], 1.05),
        ["TVKD ÷ DPO step, ratio of fastest steps", _min_ratio(times[TVKD], times[DPO]), "", ""],
        [
            "ψ's whole cost: tvkd_loss fwd+bwd, TVKD − DPO",
            f"{psi_ms[TVKD] - psi_ms[DPO]:+.3f} ms ({psi_ms[TVKD]:.3f} vs {psi_ms[DPO]:.3f} ms)",
            "",
            "",
        ],
    ]
    trl = {name: t for name, t in times.items() if name.startswith("TRL")}
    if trl:
        # The verdict: each side's fastest setting (TRL's may be bf16, TVKD's then is too), the
        # two paired step by step. Then every other pairing at equal precision, for reading.
        best = min(trl, key=lambda name: trl[name].median_ms)
        ours = [n for n in (TVKD, TVKD_BF16) if n in times]
        mine = min(ours, key=lambda name: times[name].median_ms)
        ratios.append(
            _paired_row(f"{mine} ÷ TRL's best ({best}), median of paired ratios", times[mine], trl[best], 0.8)
        )
        ratios.append(
            [
                "the same, ratio of medians",
                f"{times[mine].median_ms / trl[best].median_ms:.3f}",
                "≤ 0.80",
                "",
            ]
        )
        ratios.append(["the same, ratio of fastest steps", _min_ratio(times[mine], trl[best]), "", ""])
        for name, t in trl.items():
            mate = TVKD_BF16 if "bf16" in name and TVKD_BF16 in times else TVKD
            ratios.append([f"{mate} ÷ {name}, median of paired ratios", _paired(times[mate], t), "", ""])
        if mine != TVKD:
            ratios.append(
                [f"{TVKD} ÷ TRL's best, median of paired ratios", _paired(times[TVKD], trl[best]), "", ""]
            )
    return out + "\n\n" + markdown_table(["comparison", "measured", "target", "met"], ratios)


def _paired(a: Timings, b: Timings) -> str:
    return f"{median([x / y for x, y in zip(a.seconds, b.seconds, strict=True)]):.3f}"


def _paired_row(label: str, a: Timings, b: Timings, target: float) -> list[str]:
    ratio = median([x / y for x, y in zip(a.seconds, b.seconds, strict=True)])
    return [label, f"{ratio:.3f}", f"≤ {target:.2f}", "yes" if ratio <= target else "no"]


def _min_ratio(a: Timings, b: Timings) -> str:
    return f"{min(a.seconds) / min(b.seconds):.3f}"


def loss_only_ms(batch: Any, options: dict[str, dict[str, Any]], repeats: int = 300) -> dict[str, float]:
    """Median ms of tvkd_loss forward + backward on one collated batch, per option set, the sets
    taking turns call by call. This is the only part of the step where TVKD and DPO differ (ψ is
    a constant in θ), so the difference is all that ψ costs."""
    logps = torch.randn(batch.response_mask.shape).clamp(max=0.0)

    def run(opts: dict[str, Any]) -> None:
        x = logps.clone().requires_grad_(True)
        chosen, rejected = batch.split(x)
        loss, _ = tvkd_loss(
            chosen, rejected, *batch.split(batch.ref_logps), *batch.split(batch.values),
            *batch.split(batch.response_mask), **batch.teacher, **opts,
        )  # fmt: skip
        loss.backward()

    times: dict[str, list[float]] = {name: [] for name in options}
    for i in range(repeats + 10):
        for name, opts in options.items():
            t0 = time.perf_counter()
            run(opts)
            if i >= 10:  # the first calls warm up
                times[name].append(time.perf_counter() - t0)
    return {name: median(t) * 1e3 for name, t in times.items()}


if __name__ == "__main__":
    raise SystemExit(main())
