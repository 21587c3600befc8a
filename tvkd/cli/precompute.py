"""`tvkd precompute`: run the teacher over a preference dataset into the value store (no server).

Prints the content key, the store folder, whether it was a cache hit, the pair count, teacher
throughput and the store's size per response token. Exit codes: 0 done (or cached), 1 bad data
or a teacher that cannot be used, 2 usage.

Under torchrun (`torchrun --standalone --nproc-per-node N -m tvkd.cli precompute ...`, same
flags) rank r computes the store's shards r, r+N, ... on its own device (cuda:LOCAL_RANK when
there is a GPU) and writes them; rank 0 then waits until every shard is on disk, writes the
manifest and prints the summary. The store is bit-identical to a one-process run's. Every rank
prints a progress line (prefixed with its rank) every few seconds; a rerun after a crash keeps
the finished shards. No process group is needed: the ranks meet in the store's folder (which
must be one filesystem for all of them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
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


def _device(name: str | None, local_rank: int = 0) -> str:
    if name:
        return name
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (`tvkd.distributed.context`)."""
    from tvkd.distributed import context

    ctx = context()
    return ctx.rank, ctx.world_size, ctx.local_rank


class ProgressLines:
    """`progress(done, total)` that prints one line every `every` seconds (and the last one):
    `[rank 1/2] precompute: 120/500 pairs (24%), 3.1 pairs/s` (no prefix for one process)."""

    def __init__(self, prefix: str, every: float = 5.0) -> None:
        self.prefix, self.every = prefix, every
        self.start = self.last = time.monotonic()
        self.first_done: int | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first_done is None:
            self.first_done = done  # shards found on disk are not this run's speed
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = (done - self.first_done) / max(now - self.start, 1e-9)
        pct = 100 * done / total if total else 100.0
        print(
            f"{self.prefix}precompute: {done}/{total} pairs ({pct:.0f}%), {rate:.1f} pairs/s", file=sys.stderr
        )


def run(args: argparse.Namespace) -> int:
    from tvkd.data import DataError, load_pairs
    from tvkd.models import ModelError
    from tvkd.teacher import UnsupportedTeacher

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
    try:
        if _rank_world()[1] > 1:
            return _run_rank(args, config, pairs, load_report, on_error, root)
        return _run_one(args, config, pairs, load_report, on_error, root)
    except (ConfigError, DataError, ModelError, UnsupportedTeacher) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _bar() -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar on a terminal, else progress lines every few seconds: (progress, close)."""
    if not sys.stderr.isatty():
        return ProgressLines(""), lambda: None
    from tqdm import tqdm

    bar = tqdm(unit="pair", desc="precompute", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress, bar.close


def _run_one(
    args: argparse.Namespace,
    config: PrecomputeConfig,
    pairs: Any,
    load_report: Any,
    on_error: Any,
    root: Path,
) -> int:
    from tvkd.precompute import precompute_values

    progress, close = _bar()
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
    finally:
        close()
    tokens = None
    if not result.cached:
        rate = f"{result.tokens_per_second:.0f} tokens/s in the teacher forward"
        tokens = f"{result.tokens} teacher tokens ({rate}); {result.seconds:.1f}s in all"
    _summary(result.key, result.store, result.cached, result.pairs, tokens, config)
    for report in (load_report, result.report):
        if report.issues:
            print(report.summary())
    return 0


def _run_rank(
    args: argparse.Namespace,
    config: PrecomputeConfig,
    pairs: Any,
    load_report: Any,
    on_error: Any,
    root: Path,
) -> int:
    """One torchrun rank: its shards, then (rank 0) wait for every shard and write the manifest."""
    from tvkd.precompute import finalize_if_complete, num_shards, precompute_shards, rank_shards, store_report

    rank, world, local_rank = _rank_world()
    prefix = f"[rank {rank}/{world}] "
    res = precompute_shards(
        args.teacher,
        pairs,
        config,
        store_root=root,
        shards=rank_shards(num_shards(len(pairs), config), rank, world),
        device=_device(args.device, local_rank),
        progress=ProgressLines(prefix),
        on_error=on_error,
        teacher_reference=args.teacher_reference,
        made_by={"rank": rank, "world_size": world},
    )
    print(
        f"{prefix}computed shards {res.computed} of {res.num_shards}: {res.tokens} teacher tokens, "
        f"{res.seconds:.1f}s",
        file=sys.stderr,
    )
    if rank != 0:
        return 0
    last = time.monotonic()
    timings = {"seconds": round(res.seconds, 3), "world_size": world, "device": res.device}
    while (
        store := finalize_if_complete(
            root, res.key, res.fields, num_pairs=len(pairs), config=res.config, timings=timings
        )
    ) is None:
        if time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"{prefix}waiting for the other ranks' shards", file=sys.stderr)
        time.sleep(2.0)
    tokens = (
        f"{store.manifest['teacher_tokens']} teacher tokens by {world} ranks; {res.seconds:.1f}s on rank 0"
    )
    _summary(res.key, store, res.complete, len(pairs), None if res.complete else tokens, res.config)
    for report in (load_report, store_report(f"precompute({args.teacher})", store)):
        if report.issues:
            print(report.summary())
    return 0


def _summary(
    key: str, store: Any, cached: bool, pairs: int, tokens: str | None, config: PrecomputeConfig
) -> None:
    from tvkd.teacher_check import teacher_check

    print(f"key:        {key}")
    print(f"store:      {store.path}")
    print(f"cached:     {'yes' if cached else 'no'}")
    print(f"pairs:      {len(store) - len(store.missing)} of {pairs} ({len(store.missing)} missing)")
    if tokens is not None:
        print(f"tokens:     {tokens}")
    print(f"size:       {store.nbytes()} bytes, {store.bytes_per_response_token():.2f} bytes/response token")
    method = MethodConfig(q_source=config.q_source, value_beta=config.value_beta)
    check = teacher_check(store, range(pairs), method)
    print(f"teacher:    {check.message()} [shaping='value', gamma=1, terminal='model']")
