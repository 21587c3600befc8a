"""`tvkd data`: dataset commands. `tvkd data check PATH` loads a preference dataset, prints the
report (rows kept/dropped and every bad row with its row, field and reason) and, given
`--tokenizer`, also tokenizes it to find rows over `--max-length` or failing the chat template.

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
    tokenize_pairs,
)

# Same default as PrecomputeConfig.max_length.
DEFAULT_MAX_LENGTH = 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data", help="check preference datasets", description="Dataset commands."
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="load a dataset and report its bad rows",
        description="Load a preference dataset and report kept/dropped rows and every bad row.",
    )
    check.add_argument("path", help="JSONL(.gz)/JSON/Parquet file, datasets folder or hub id")
    check.add_argument("--format", choices=FORMATS, default="auto", help="row form (default auto)")
    check.add_argument("--split", default="train", help="split of a datasets source (train)")
    check.add_argument("--limit", type=int, default=None, help="read only the first N rows")
    check.add_argument("--tokenizer", metavar="MODEL_DIR", help="also tokenize with this tokenizer")
    check.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"longest prompt+response in tokens, with --tokenizer (default {DEFAULT_MAX_LENGTH})",
    )
    check.add_argument(
        "--drop", action="store_true", help="accept bad rows (they are dropped): exit 0"
    )
    check.set_defaults(func=run_check)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_check(args: argparse.Namespace) -> int:
    try:
        pairs, report = load_pairs(
            args.path, split=args.split, format=args.format, on_error="drop", limit=args.limit
        )
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary(SUMMARY_MAX_ISSUES))
    reports, usable = [report], report.kept
    if args.tokenizer and pairs:
        tokenized = _check_tokenization(args.tokenizer, pairs, args.max_length)
        if tokenized is None:
            return 1
        reports.append(tokenized)
        usable = tokenized.kept
    return _verdict(reports, usable, args.drop)


def _check_tokenization(
    model_dir: str, pairs: list[PreferencePair], max_length: int
) -> DataReport | None:
    """Print the tokenization report; None (after printing why) when it cannot run at all."""
    from transformers import AutoTokenizer  # heavy: only when asked to tokenize

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load tokenizer {model_dir!r}: {exc}", file=sys.stderr)
        return None
    try:
        tokenized, report = tokenize_pairs(tokenizer, pairs, max_length=max_length, on_error="drop")
    except (DataError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    print(report.summary(SUMMARY_MAX_ISSUES))
    if tokenized:
        lengths = [
            len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in tokenized
        ]
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
