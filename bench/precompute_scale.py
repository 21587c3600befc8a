"""The sharded teacher precompute: N torchrun ranks against one process, wall time and equality.

The same tiny teacher (BPE trained on HH text, so token counts are realistic) runs over the same
real HH pairs through the library CLI, as a user runs it:

- one process:  `python -m tvkd.cli precompute ...`, with 1 thread and with every thread;
- N processes:  `python -m torch.distributed.run --standalone --nproc-per-node N -m tvkd.cli
  precompute ...` (1 thread a rank, torchrun's default): rank r computes shards r, r+N, ...;
  rank 0 waits for the others' shards and writes the manifest.

Each run writes its own store; wall seconds count the whole command (interpreter and torch
start-up, teacher load, the pass, the files), the figure a user waits for. The runs take turns,
the order rotating each repeat; a figure is the median. Every N-process store is compared with
the one-process store (`tvkd.store_compare.store_differences`: every array of every shard
byte for byte, the manifests but for timings): "equal" or what differs.

    python bench/precompute_scale.py               # 512 HH pairs, shards of 32, 2 ranks (~4 min on 2 cores)
    python bench/precompute_scale.py --smoke       # seconds; checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/precompute_scale.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import default_hh_path, environment_line, hh_corpus, markdown_table, median, quiet

from tvkd.data import load_pairs
from tvkd.model_prep import build_tiny_model
from tvkd.store import ValueStore
from tvkd.store_compare import store_differences

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=default_hh_path())
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun run")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        args.pairs, args.shard_size, args.hidden, args.layers, args.vocab, args.repeats = 16, 4, 32, 1, 512, 1
    return args


def run(cmd: list[str], threads: int | None) -> float:
    """Wall seconds of `cmd` (its output kept for an error)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:8])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    print(environment_line())
    pairs, _ = load_pairs(args.data, on_error="drop", limit=args.pairs)
    corpus_pairs, _ = load_pairs(args.data, on_error="drop", limit=max(args.pairs, 1000))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = build_tiny_model(
            work / "teacher",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=max(1, args.hidden // 32),
            intermediate_size=4 * args.hidden,
            max_position_embeddings=max(512, args.max_length),
            corpus=hh_corpus(corpus_pairs),
        )
        data = work / "pairs.jsonl"
        rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        flags = [
            "precompute", "--teacher", str(teacher), "--data", str(data), "--device", "cpu",
            "--shard-size", str(args.shard_size), "--max-length", str(args.max_length), "--drop-bad-rows",
        ]  # fmt: skip
        cpus = os.cpu_count() or 1
        one = [sys.executable, "-m", "tvkd.cli", *flags]
        ranks = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(args.nproc),
        ]
        runs = {
            "1 process, 1 thread": (one, 1),
            f"1 process, {cpus} threads": (one, cpus),
            f"{args.nproc} torchrun ranks, 1 thread each": ([*ranks, "-m", "tvkd.cli", *flags], 1),
        }
        names = list(runs)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        stores: dict[str, Path] = {}
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cmd, threads = runs[name]
                root = work / f"store-{r}-{names.index(name)}"
                seconds[name].append(run([*cmd, "--store-root", str(root)], threads))
                stores.setdefault(name, root)
        opened = {
            name: ValueStore.open(next(p for p in root.iterdir() if p.is_dir()))
            for name, root in stores.items()
        }
        reference = opened[names[0]]
        tokens = int(reference.manifest["teacher_tokens"])
        shards = len(reference.manifest["shards"])
        diffs = {name: store_differences(reference, opened[name]) for name in names[1:]}

    base = median(seconds[names[0]])
    table = []
    for name in names:
        diff = diffs.get(name, [])
        equal = "reference" if name == names[0] else ("equal" if not diff else "; ".join(diff[:3]))
        s = median(seconds[name])
        table.append([name, s, tokens / s, base / s, equal])
    print(
        f"\n{len(pairs)} HH pairs, {tokens} teacher tokens, {shards} shards of {args.shard_size}; teacher "
        f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; median of {args.repeats} "
        "(whole command: start-up, load, pass, files)\n"
    )
    print(markdown_table(["run", "wall s", "tokens/s", "speed-up vs 1 thread", "store vs 1 process"], table))
    return 0 if all(row[-1] in ("reference", "equal") for row in table) else 1


if __name__ == "__main__":
    raise SystemExit(main())
