"""Shared helpers of the bench scripts: timing, tables, environment line.

Every script measures the things it compares side by side in one process, so ratios are taken
between numbers from the same machine, threads and warm caches. Absolute times are printed for
context only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tvkd.data import PreferencePair

if __package__ in (None, ""):  # `python bench/<script>.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HH_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def default_hh_path() -> Path:
    """The real HH test file beside the repository (DESIGN.md: read there, never copied in)."""
    env = os.environ.get("TVKD_BENCH_HH")
    return Path(env) if env else HH_TEST


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones.

    `sync` (e.g. torch.cuda.synchronize) runs before each clock read so asynchronous device work
    is charged to the call that queued it.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_argument(parser: Any) -> None:
    """--clock wall|cpu: what a timing reads (see `CLOCKS`)."""
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: CPU seconds of this process (all threads), which waiting for "
        "the cores of a busy shared machine does not inflate; use it with --threads 1 (idle OpenMP "
        "threads spin and would count)",
    )


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's parser: its description is the docstring's first paragraph; --data is the
    HH file beside the repository (`default_hh_path`)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--data", default=str(default_hh_path()), help="HH jsonl(.gz) (default: ../shared/data)")
    return p


def add_model_size(parser: argparse.ArgumentParser, *, vocab: int, hidden: int, layers: int) -> None:
    """--vocab, --hidden and --layers of the script's tiny model, with these defaults."""
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)


def add_run_arguments(parser: argparse.ArgumentParser, *, clock: bool = True) -> None:
    """The arguments a bench script ends with: --clock (with `clock`), --threads, --smoke."""
    if clock:
        add_clock_argument(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="minimal sizes: checks that the script runs")


def start(args: argparse.Namespace, *, seed: int | None = None) -> Callable[[], float]:
    """Set the threads (and the seed), silence the libraries and print the environment line;
    returns the clock `args.clock` names (wall time for a script without --clock)."""
    torch.set_num_threads(args.threads)
    if seed is not None:
        torch.manual_seed(seed)
    quiet()
    print(environment_line())
    return CLOCKS[getattr(args, "clock", "wall")]


def tiny_teacher(
    path: Path, args: argparse.Namespace, corpus: Sequence[PreferencePair], **shape: Any
) -> Path:
    """A tiny random Llama of the script's size (--vocab, --hidden, --layers, --max-length) with a
    BPE tokenizer trained on `corpus`' text; `shape` sets the rest (num_heads, intermediate_size)."""
    from tvkd.model_prep import build_tiny_model

    return build_tiny_model(
        path,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        max_position_embeddings=max(512, args.max_length),
        corpus=hh_corpus(corpus),
        **shape,
    )


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min–max of the repeats in ms, so a reader can judge the noise behind a median."""
    return f"{min(xs) * 1e3:.1f}–{max(xs) * 1e3:.1f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown pipe table with columns padded for reading in a terminal too."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3f}"
    return str(x)


def environment_line(device: str = "cpu") -> str:
    parts = [
        f"torch {torch.__version__}",
        f"threads {torch.get_num_threads()}",
        f"python {platform.python_version()}",
    ]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:  # the bench still runs its pure-torch parts
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    else:
        parts.append(platform.processor() or platform.machine())
    if hasattr(os, "getloadavg"):  # other processes on the machine skew absolute times
        parts.append(f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return "environment: " + ", ".join(parts)


def hh_corpus(pairs: Sequence[PreferencePair], limit: int = 2000) -> list[str]:
    """Dialogue texts to train the tiny models' BPE on, so HH text tokenizes like a real model's
    (≈ 4 characters a token) instead of nearly byte by byte with the built-in toy corpus."""
    out: list[str] = []
    for p in pairs[:limit]:
        out += [p.prompt + p.chosen, p.rejected]
    return out


def select_by_length(
    tokenizer: Any, pairs: Sequence[PreferencePair], *, max_length: int, min_length: int, count: int
) -> list[PreferencePair]:
    """The first `count` pairs whose longer side (prompt + response, EOS included) has between
    `min_length` and `max_length` tokens: batches of realistic, similar lengths."""
    from tvkd.data import RowError
    from tvkd.tokenize import tokenize_pair

    chosen = []
    for p in pairs:
        try:
            tp = tokenize_pair(tokenizer, p, max_length=max_length)
        except RowError:
            continue
        longest = len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids))
        if longest >= min_length:
            chosen.append(p)
            if len(chosen) == count:
                break
    return chosen


def quiet() -> None:
    """Silence progress bars and deprecation chatter of the libraries, so the output is the table."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)
