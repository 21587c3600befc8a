"""`tvkd precompute`: run the teacher over a preference dataset into the value store (no server).

Prints the content key, the store folder, whether it was a cache hit, the pair count, teacher
throughput and the store's size per response token. Exit codes: 0 done (or cached), 1 bad data
or a teacher that cannot be used, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tvkd.config import Q_SOURCES, ConfigError, MethodConfig, PrecomputeConfig, field_help

_DEFAULTS = PrecomputeConfig()


def default_store_root() -> Path:
    """$TVKD_ARTIFACT_ROOT/values, else ./.tvkd/values."""
    root = os.environ.get("TVKD_ARTIFACT_ROOT")
    return (Path(root).expanduser() if root else Path(".tvkd")) / "values"


def register(subparsers: Any) -> None:
    helps = field_help(PrecomputeConfig)
    p = subparsers.add_parser(
        "precompute",
        help="compute teacher values for a dataset (cached by content key)",
        description="Run the teacher over a preference dataset and store V at every response state.",
    )
    p.add_argument("--teacher", required=True, help="teacher model folder (or cached hub id)")
    p.add_argument(
        "--teacher-reference",
        help="the model the teacher was DPO-trained from; needed by --q-source implicit",
    )
    p.add_argument("--data", required=True, help="JSONL(.gz)/JSON/Parquet file or datasets folder")
    p.add_argument(
        "--store-root",
        type=Path,
        default=None,
        help="value store root (default: $TVKD_ARTIFACT_ROOT/values, else ./.tvkd/values)",
    )
    p.add_argument("--q-source", choices=Q_SOURCES, default=_DEFAULTS.q_source, help=helps["q_source"])
    p.add_argument("--value-beta", type=float, default=_DEFAULTS.value_beta, help=helps["value_beta"])
    p.add_argument("--topk", type=int, default=_DEFAULTS.topk, help=helps["topk"])
    p.add_argument("--token-stats", action="store_true", help=helps["token_stats"])
    p.add_argument("--max-length", type=int, default=_DEFAULTS.max_length, help=helps["max_length"])
    p.add_argument("--batch-tokens", type=int, default=_DEFAULTS.batch_tokens, help=helps["batch_tokens"])
    p.add_argument("--shard-size", type=int, default=_DEFAULTS.shard_size, help=helps["shard_size"])
    p.add_argument("--bf16", action="store_true", help=helps["bf16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--drop-bad-rows",
        action="store_true",
        help="drop unreadable or too-long rows (listed in the report) instead of failing",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows of the dataset")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> PrecomputeConfig:
    return PrecomputeConfig(
        q_source=args.q_source,
        value_beta=args.value_beta,
        topk=args.topk,
        token_stats=args.token_stats,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        shard_size=args.shard_size,
        bf16=args.bf16,
    )


def _device(name: str | None) -> str:
    if name:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tvkd.data import DataError, load_pairs
    from tvkd.models import ModelError
    from tvkd.precompute import precompute_values
    from tvkd.teacher import UnsupportedTeacher
    from tvkd.teacher_check import teacher_check

    on_error = "drop" if args.drop_bad_rows else "raise"
    try:
        config = _config(args)
        pairs, load_report = load_pairs(args.data, on_error=on_error, limit=args.limit)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not pairs:
        print(f"error: no usable pair in {args.data}", file=sys.stderr)
        return 1
    root = args.store_root or default_store_root()
    bar = tqdm(total=len(pairs), unit="pair", desc="precompute", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        result = precompute_values(
            args.teacher,
            pairs,
            config,
            store_root=root,
            device=_device(args.device),
            progress=progress,
            on_error=on_error,
            teacher_reference=args.teacher_reference,
        )
    except (ConfigError, DataError, ModelError, UnsupportedTeacher) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    store = result.store
    print(f"key:        {result.key}")
    print(f"store:      {store.path}")
    print(f"cached:     {'yes' if result.cached else 'no'}")
    print(f"pairs:      {len(store) - len(store.missing)} of {result.pairs} ({len(store.missing)} missing)")
    if not result.cached:
        rate = f"{result.tokens_per_second:.0f} tokens/s in the teacher forward"
        print(f"tokens:     {result.tokens} teacher tokens ({rate}); {result.seconds:.1f}s in all")
    print(f"size:       {store.nbytes()} bytes, {store.bytes_per_response_token():.2f} bytes/response token")
    method = MethodConfig(q_source=config.q_source, value_beta=config.value_beta)
    check = teacher_check(store, range(len(pairs)), method)
    print(f"teacher:    {check.message()} [shaping='value', gamma=1, terminal='model']")
    for report in (load_report, result.report):
        if report.issues:
            print(report.summary())
    return 0
