"""`tvkd data`: dataset commands. `tvkd data generate OUT` writes the generated, verifiable
preference task of tvkd.tasks (train.jsonl + eval.jsonl). `tvkd data check PATH` loads a
preference dataset, prints the report (rows kept/dropped and every bad row with its row, field
and reason) and, given `--tokenizer`, also tokenizes it to find rows over `--max-length` or
failing the chat template.

Exit codes: 0 clean (or bad rows accepted with `--drop`), 1 bad rows / unreadable data / no
usable pair, 2 usage. tvkd.data imports no torch, so a check without a tokenizer stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tvkd.data import (
    FORMATS,
    SUMMARY_MAX_ISSUES,
    DataError,
    DataReport,
    PreferencePair,
    load_pairs,
)
from tvkd.tasks import FAMILIES, generate, split, write_jsonl
from tvkd.tokenize import TRUNCATION_MODES, tokenize_pairs
from tvkd.windows import config_window

# Same default as PrecomputeConfig.max_length.
DEFAULT_MAX_LENGTH = 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data", help="generate or check preference datasets", description="Dataset commands."
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="load a dataset and report its bad rows",
        description="Load a preference dataset and report kept/dropped rows and every bad row.",
    )
    check.add_argument("path", help="JSONL(.gz)/JSON/Parquet file, datasets folder or hub id")
    check.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="dataset layout (default auto: detected, and said why)",
    )
    check.add_argument(
        "--columns",
        metavar="NAME=SOURCE,...",
        help="read source columns under tvkd's names first, e.g. prompt=question,chosen=response_j "
        "(names: prompt, chosen, rejected, messages, tools, system, question; a.b reads inside an object)",
    )
    check.add_argument("--split", default="train", help="split of a datasets source (train)")
    check.add_argument("--limit", type=int, default=None, help="read only the first N rows")
    check.add_argument("--tokenizer", metavar="MODEL_DIR", help="also tokenize with this tokenizer")
    check.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"longest prompt+response in tokens, with --tokenizer (default {DEFAULT_MAX_LENGTH}; "
        "capped at the model's context window when MODEL_DIR has a config)",
    )
    check.add_argument(
        "--truncation-mode",
        choices=TRUNCATION_MODES,
        default="none",
        help="rows longer than the max length: bad rows (none), or cut as TRL does (keep_start, keep_end)",
    )
    check.add_argument("--drop", action="store_true", help="accept bad rows (they are dropped): exit 0")
    check.set_defaults(func=run_check)

    gen = actions.add_parser(
        "generate",
        help="write the generated arithmetic/sorting/spelling preference task",
        description="Write OUT/train.jsonl and OUT/eval.jsonl: conversational preference pairs "
        "(chosen = the correct answer, rejected = a plausible wrong one), deterministic from --seed.",
    )
    gen.add_argument("out", help="output folder")
    gen.add_argument("--n", type=int, default=600, help="pairs in all (default 600)")
    gen.add_argument("--eval", type=int, default=100, help="held-out pairs among them (default 100)")
    gen.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    gen.add_argument("--families", default=",".join(FAMILIES), help="comma-separated task families")
    gen.set_defaults(func=run_generate)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_check(args: argparse.Namespace) -> int:
    try:
        pairs, report = load_pairs(
            args.path,
            split=args.split,
            format=args.format,
            columns=args.columns,
            on_error="drop",
            limit=args.limit,
        )
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad --columns
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(SUMMARY_MAX_ISSUES))
    reports, usable = [report], report.kept
    if args.tokenizer and pairs:
        tokenized = _check_tokenization(args.tokenizer, pairs, args.max_length, args.truncation_mode)
        if tokenized is None:
            return 1
        reports.append(tokenized)
        usable = tokenized.kept
    return _verdict(reports, usable, args.drop)


def _check_tokenization(
    model_dir: str, pairs: list[PreferencePair], max_length: int, truncation_mode: str
) -> DataReport | None:
    """Print the tokenization report; None (after printing why) when it cannot run at all."""
    from transformers import AutoConfig  # heavy: only when asked to tokenize

    from tvkd.models import ModelError, load_tokenizer

    try:  # as training loads it: a missing path named, a slow tokenizer refused, pad = eos
        tokenizer = load_tokenizer(model_dir)
    except ModelError as exc:
        print(f"error: cannot load tokenizer {model_dir!r}: {exc}", file=sys.stderr)
        return None
    try:  # a tokenizer-only folder has no config and no window
        window = config_window(AutoConfig.from_pretrained(model_dir))
    except (OSError, ValueError, KeyError):
        window = None
    if window is not None and window.tokens < max_length:
        print(
            f"  max_length {max_length} capped at the model's context window "
            f"({window.attribute}={window.tokens})"
        )
        max_length = window.tokens
    try:
        tokenized, report = tokenize_pairs(
            tokenizer, pairs, max_length=max_length, on_error="drop", truncation_mode=truncation_mode
        )
    except (DataError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    print(report.summary(SUMMARY_MAX_ISSUES))
    if tokenized:
        lengths = [len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in tokenized]
        print(
            f"  tokens per pair (prompt + longer response): max {max(lengths)}, "
            f"mean {sum(lengths) / len(lengths):.1f}"
        )
    return report


def _verdict(reports: list[DataReport], usable: int, accept_drops: bool) -> int:
    bad = sum(r.dropped for r in reports)
    if usable == 0:
        print("FAILED: no usable pairs")
        return 1
    if bad and not accept_drops:
        print(f"FAILED: {bad} bad rows (pass --drop to accept dropping them); {usable} usable")
        return 1
    print(f"OK: {usable} usable pairs" + (f", {bad} bad rows dropped" if bad else ""))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        examples = generate(args.n, seed=args.seed, families=tuple(args.families.split(",")))
        train, held_out = split(examples, eval_count=args.eval)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held_out, out / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} held-out pairs to {out}")
    return 0
