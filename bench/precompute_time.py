"""Teacher precompute throughput of TVKD against the released research code's method.

The same tiny teacher (random weights, BPE trained on HH text so token counts are realistic)
runs over the same real HH pairs, tokenized the same way (`tvkd.tokenize.tokenize_pair`), both
sides of each pair, and writes its results to disk:

- TVKD: `tvkd.precompute.precompute_values` (the default store: V at each response state,
  float32): sequences sorted by length and batched up to `batch_tokens` padded tokens, the
  decoder run once per batch, the LM head + logsumexp on the response positions only, a chunk
  at a time (never [tokens × vocab] logits); float32 unless `--bf16`.
- research method (reimplemented here from its description, not imported): one sequence per
  forward, the model in fp16, full [length × vocab] logits, a full softmax, the top-50
  probabilities and token ids of every response position kept as float64 / int64 plus one
  float64 per position (the log-normaliser), written as one `.npz` per pair: 808 B per response
  token, the figure of the released format. The same method in float32 is timed too, because a
  CPU has no fast fp16 matmul: that row isolates what the method costs from what the dtype costs.

Each call covers all pairs end to end (tokenization, forwards, writing the files); the model is
loaded once beforehand for every path. The paths take turns, the order rotating each repeat,
and the verdict is the median of paired ratios (two paths' calls in the same round).
tokens/s = teacher tokens (prompt + response, both sides) ÷ seconds; B/token = bytes of all
files written ÷ response tokens.

    python bench/precompute_time.py          # 64 HH pairs, tiny teacher (~2 min on 2 cores)
    python bench/precompute_time.py --smoke  # seconds; checks the script only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_model_size,
    add_run_arguments,
    bench_parser,
    markdown_table,
    median,
    start,
    tiny_teacher,
)

from tvkd.config import PrecomputeConfig
from tvkd.data import PreferencePair, RowError, load_pairs
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.precompute import precompute_values
from tvkd.tokenize import tokenize_pair

OURS = "TVKD precompute_values (values only)"
RESEARCH_FP16 = "research method: fp16, 1 seq/batch, full softmax, top-50"
RESEARCH_FP32 = "research method in float32 (same precision as TVKD)"
TOPK = 50


def research_precompute(
    model: Any, tokenizer: Any, pairs: list[PreferencePair], out: Path, *, max_length: int
) -> tuple[int, int]:
    """The research code's teacher pass, reimplemented: per sequence, full logits in the model's
    dtype, full softmax, top-50 of each response position; one `.npz` per pair (float64 top-k
    probabilities, int64 ids, float64 log-normaliser per position). Returns (teacher tokens,
    response tokens)."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = response_tokens = 0
    dev = next(model.parameters()).device
    for i, pair in enumerate(pairs):
        try:
            tp = tokenize_pair(tokenizer, pair, max_length=max_length, index=i)
        except RowError:
            continue
        arrays: dict[str, np.ndarray] = {}
        for side, resp in (("chosen", tp.chosen_ids), ("rejected", tp.rejected_ids)):
            ids = torch.tensor([list(tp.prompt_ids) + list(resp)], device=dev)
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0]  # [L, V] in the model dtype
            # the logits at position P-1+t predict response token t
            z = logits[len(tp.prompt_ids) - 1 : ids.shape[1] - 1]
            probs = torch.softmax(z, dim=-1)
            top = probs.topk(TOPK, dim=-1)
            arrays[f"{side}_topk_probs"] = top.values.double().cpu().numpy()
            arrays[f"{side}_topk_ids"] = top.indices.cpu().numpy().astype(np.int64)
            arrays[f"{side}_log_norm"] = torch.logsumexp(z.float(), -1).double().cpu().numpy()
            tokens += ids.shape[1]
            response_tokens += len(resp)
        np.savez(out / f"pair-{i:06d}.npz", **arrays)
    return tokens, response_tokens


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--pairs", type=int, default=64, help="HH pairs per call")
    p.add_argument("--max-length", type=int, default=512, help="longer pairs are left out by both paths")
    add_model_size(p, vocab=8192, hidden=128, layers=2)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (after one warm-up)")
    p.add_argument("--batch-tokens", type=int, default=PrecomputeConfig().batch_tokens)
    p.add_argument("--bf16", action="store_true", help="TVKD's decoder under bf16 autocast")
    p.add_argument("--skip-fp32", action="store_true", help="no float32 row of the research method")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.pairs, args.vocab, args.hidden, args.layers, args.max_length = 4, 512, 32, 1, 1024
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = start(args)
    pairs, _ = load_pairs(args.data, on_error="drop", limit=args.pairs)
    corpus_pairs, _ = load_pairs(args.data, on_error="drop", limit=max(args.pairs, 1000))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = tiny_teacher(
            work / "teacher",
            args,
            corpus_pairs,
            num_heads=max(1, args.hidden // 32),
            intermediate_size=4 * args.hidden,
        )
        tokenizer = load_tokenizer(str(teacher))
        model32 = load_causal_lm(str(teacher), dtype=torch.float32).eval()
        model16 = load_causal_lm(str(teacher), dtype=torch.float16).eval()
        config = PrecomputeConfig(max_length=args.max_length, batch_tokens=args.batch_tokens, bf16=args.bf16)
        counts: dict[str, tuple[int, int, int]] = {}  # path → (tokens, response tokens, bytes)

        def ours(out: Path) -> None:
            result = precompute_values(
                teacher, pairs, config, store_root=out, model=model32, tokenizer=tokenizer
            )
            store = result.store
            counts[OURS] = (result.tokens, store.response_tokens(), folder_bytes(out))

        def research(model: Any, name: str) -> Any:
            def run(out: Path) -> None:
                tok, resp = research_precompute(model, tokenizer, pairs, out, max_length=args.max_length)
                counts[name] = (tok, resp, folder_bytes(out))

            return run

        paths = {OURS: ours, RESEARCH_FP16: research(model16, RESEARCH_FP16)}
        if not args.skip_fp32:
            paths[RESEARCH_FP32] = research(model32, RESEARCH_FP32)
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for r in range(args.repeats + 1):  # round 0 warms up (first calls, allocator) untimed
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out = work / f"out-{r}-{names.index(name)}"
                t0 = clock()
                paths[name](out)
                elapsed = clock() - t0
                if r > 0:
                    seconds[name].append(elapsed)
                shutil.rmtree(out)

    tokens = {name: counts[name][0] for name in names}
    if len(set(tokens.values())) != 1:  # both must have covered the same pairs and sequences
        print(f"the paths covered different tokens: {tokens}", file=sys.stderr)
        return 1
    if counts[OURS][1] == 0:
        print(f"no pair fits --max-length {args.max_length} teacher tokens", file=sys.stderr)
        return 1
    print(
        f"\n## Precompute: {len(pairs)} HH pairs, {tokens[OURS]:,} teacher tokens "
        f"({counts[OURS][1]:,} response), teacher {args.hidden} hidden × {args.layers} layers, "
        f"vocab {args.vocab}, {args.threads} threads, {args.clock} clock, {args.repeats} repeats\n"
    )
    rows = []
    for name in names:
        tok, resp, nbytes = counts[name]
        s = seconds[name]
        rows.append(
            [
                name,
                f"{median(s):.2f}",
                f"{min(s):.2f}–{max(s):.2f}",
                f"{tok / median(s):,.0f}",
                f"{nbytes / resp:.1f}",
                _paired(seconds[name], seconds[OURS]),
            ]
        )
    print(
        markdown_table(["path", "median s", "min–max s", "tokens/s", "B/response token", "time ÷ TVKD"], rows)
    )
    print(
        "\ntime ÷ TVKD: median of the paired ratios (the two paths' calls in the same round). "
        "Both include tokenization and writing the files; model loading is excluded for both."
    )
    return 0


def _paired(a: list[float], b: list[float]) -> str:
    return f"{median([x / y for x, y in zip(a, b, strict=True)]):.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
