"""Bytes on disk per response token of the teacher value store, beside the research code's format.

A tiny teacher (random weights, BPE trained on HH text so that token counts are realistic)
precomputes a value store over N real HH pairs with `tvkd.precompute.precompute_values`, once
per storage option; every file of the store folder counts (shards, manifest, lock file). The
released research code keeps the teacher's top-50 per token: 808 B per token (the reference
figure for that format; it equals 50 × (8-byte value + 8-byte id) + 8 bytes, i.e. float64/int64
arrays). TVKD's default keeps V only: T+1 float32 per response, plus offsets and a header.

Rows:
- topk=0, token_stats=False (the default: all `shaping="value"` needs);
- token_stats=True (adds the teacher's log-prob and logit of each token, for the action-
  dependent ablations and the inspector);
- topk=50 (and with token stats): our float32 + int32 top-k, for KD-style baselines.

    python bench/store_bytes.py              # 256 pairs
    python bench/store_bytes.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import (
    add_model_size,
    add_run_arguments,
    bench_parser,
    markdown_table,
    start,
    tiny_teacher,
)

from tvkd.config import PrecomputeConfig
from tvkd.data import load_pairs
from tvkd.precompute import precompute_values

RESEARCH_TOP50_BYTES_PER_TOKEN = 808.0
OPTIONS = (  # (label, topk, token_stats)
    ("values only (default)", 0, False),
    ("values + token stats", 0, True),
    ("values + top-50", 50, False),
    ("values + top-50 + token stats", 50, True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--pairs", type=int, default=256, help="HH pairs to precompute")
    p.add_argument("--max-length", type=int, default=1024, help="longer pairs are left out (and counted)")
    add_model_size(p, vocab=4096, hidden=64, layers=2)
    p.add_argument("--shard-size", type=int, default=256, help="pairs per store shard")
    add_run_arguments(p, clock=False)
    args = p.parse_args(argv)
    if args.smoke:
        args.pairs, args.vocab, args.hidden, args.layers, args.max_length = 8, 512, 32, 1, 512
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args)
    pairs, _ = load_pairs(args.data, on_error="drop", limit=args.pairs)
    corpus_pairs, _ = load_pairs(args.data, on_error="drop", limit=max(args.pairs, 1000))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = tiny_teacher(
            work / "teacher",
            args,
            corpus_pairs,
            num_heads=max(1, args.hidden // 16),
            intermediate_size=2 * args.hidden,
        )
        for label, topk, token_stats in OPTIONS:
            config = PrecomputeConfig(
                topk=topk, token_stats=token_stats, max_length=args.max_length, shard_size=args.shard_size
            )
            t0 = time.perf_counter()
            result = precompute_values(teacher, pairs, config, store_root=work / "stores")
            store = result.store
            per_token = store.bytes_per_response_token()
            rows.append(
                [
                    label,
                    f"{topk}",
                    "yes" if token_stats else "no",
                    f"{store.nbytes():,}",
                    f"{store.response_tokens():,}",
                    f"{per_token:.2f}",
                    f"{RESEARCH_TOP50_BYTES_PER_TOKEN / per_token:.1f}x",
                    f"{time.perf_counter() - t0:.1f}",
                ]
            )
            kept = len(pairs) - len(store.missing)
    print(
        f"\n## Value store size: {kept} of {len(pairs)} HH pairs (≤ {args.max_length} teacher tokens), "
        f"teacher vocab {args.vocab}\n"
    )
    headers = ["store", "top-k", "token stats", "bytes (all files)", "response tokens", "B/token"]
    headers += ["smaller than 808 B/token", "seconds"]
    print(markdown_table(headers, rows))
    print(f"\nresearch code, top-50 per token: {RESEARCH_TOP50_BYTES_PER_TOKEN:.0f} B/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
