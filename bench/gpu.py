"""GPU checks and throughput of the TVKD hot paths, beside the naive full-logits baseline.

Part (a), correctness: `tvkd_loss`, `teacher_signals` and `linear_logps` on the device against
float64 references computed on the CPU from the same (rounded) inputs, with stated tolerances
and a pass/fail per check.

Part (b), throughput on a Qwen2-shaped 0.5B model with random weights (hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings), bf16 autocast:

- precompute: decoder forward + `teacher_signals` on the response positions only, against the
  naive path (full [rows, length, vocab] logits, upcast to float32, logsumexp + gather);
- training step (8 pairs × 512 tokens by default): forward + backward with `linear_logps` on the
  response positions + `tvkd_loss` + AdamW, against the naive DPO step (full logits → float32
  log_softmax → gather), once with precomputed reference log-probs and once with a reference
  forward each step as usual DPO trainers run it.
- the levers, each beside the plain step in the same run (`--levers`, all by default):
  activation checkpointing; a micro batch of twice the pairs (with and without checkpointing);
  torch.compile of the decoder (precompute and step; first checked against eager log-probs);
  on random lengths, the padded step against packed rows without padding, per attention kernel
  (sdpa with a block-diagonal mask, flex_attention document masks on CUDA, flash_attention_2
  when flash_attn is installed), each packed layout first checked against the padded log-probs.

Model FLOPs use N = non-embedding parameters + the LM head (vocab × hidden, counted even when
tied, because its matmul runs): 2·N per token forward, 6·N per token for a training step, plus
2·N per token when the step also runs a reference forward. MFU = model FLOP/s ÷ peak (H100 and
H200 bf16 dense: 989 TFLOP/s). Both paths are credited with the same model FLOPs for the same
tokens, so MFU compares like with like; ours skips the head on prompt positions, which MFU
counts as work; tokens are real tokens (padding is not counted).

One call does everything, within `--budget-s` (420 s): a measurement not started by then is a
row "skipped", a lever that fails on the installed stack is a row with its error, and the JSON
(`$OUT/gpu.json` when OUT is set, or `--json`) is rewritten after every section, so a killed
call still leaves what it measured. Exit status 1 when a correctness check fails.
`bench/gpu_run.sh` is the prepared command for a lent machine. The checks of part (a) are in
`bench/gpu_checks.py`, the model, batches and timed paths in `bench/gpu_paths.py`.

Runs on torch ≥ 2.11 / transformers ≥ 5.17. `--cpu-smoke` shrinks everything so the script can
run (and be tested) on a CPU; its numbers mean nothing.

    python bench/gpu.py                      # on a GPU machine: checks, then every table
    python bench/gpu.py --levers compile,packed --budget-s 300
    python bench/gpu.py --cpu-smoke --compile-backend aot_eager
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gpu.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import environment_line, markdown_table, median, spread, time_calls
from gpu_checks import Check, _matmul_precision, run_correctness
from gpu_paths import (
    H100_BF16_PEAK_TFLOPS,
    QWEN2_05B,
    SMOKE,
    Batch,
    _attn,
    _checkpointing,
    build_model,
    check_compiled,
    check_packing,
    flop_params,
    make_batch,
    make_precompute_naive,
    make_precompute_ours,
    make_train_naive,
    make_train_ours,
)

from tvkd.config import PrecomputeConfig
from tvkd.logps import DEFAULT_CHUNK as LOGPS_CHUNK


@dataclass
class Measure:
    name: str
    times: list[float]
    tokens: int
    flops_per_token: float
    peak_gib: float | None
    error: str | None = None

    @property
    def ms(self) -> float:
        return median(self.times) * 1e3 if self.times else float("nan")

    @property
    def tok_s(self) -> float:
        return self.tokens / median(self.times) if self.times else float("nan")

    def mfu(self, peak_tflops: float | None) -> float:
        if not peak_tflops or not self.times:
            return float("nan")
        return self.flops_per_token * self.tok_s / (peak_tflops * 1e12)

    def to_dict(self, peak_tflops: float | None) -> dict:
        return {
            "name": self.name,
            "median_ms": self.ms,
            "tokens_per_step": self.tokens,
            "tokens_per_s": self.tok_s,
            "mfu": self.mfu(peak_tflops),
            "peak_gib": self.peak_gib,
            "times_s": self.times,
            "error": self.error,
        }


def measure(name: str, fn, *, tokens: int, flops_per_token: float, device: torch.device, args) -> Measure:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = time_calls(fn, warmup=args.warmup, repeats=args.repeats, sync=sync)
    except torch.cuda.OutOfMemoryError as exc:  # the naive path at large sizes; report, don't die
        return Measure(name, [], tokens, flops_per_token, None, error=f"OOM: {str(exc).splitlines()[0]}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Measure(name, times, tokens, flops_per_token, peak)


def table(measures: list[Measure], baseline: str | None, peak_tflops: float | None) -> str:
    base = next((m for m in measures if m.name == baseline and m.times), None)
    rows = []
    for m in measures:
        if m.error:
            rows.append([m.name, m.error, "", "", "", "", ""])
            continue
        speedup = f"{base.ms / m.ms:.2f}x" if base else "n/a"
        rows.append(
            [
                m.name,
                m.ms,
                spread(m.times),
                f"{m.tok_s:,.0f}",
                m.mfu(peak_tflops),
                "n/a" if m.peak_gib is None else f"{m.peak_gib:.1f}",
                speedup,
            ]
        )
    head = ["path", "median ms", "min–max ms", "tokens/s", "MFU", "peak GiB", "speed-up"]
    if base is None:
        return markdown_table(head, rows)
    return markdown_table(head, rows) + f"\n\nspeed-up = baseline median ÷ path median; baseline: {baseline}"


LEVERS = ("checkpointing", "micro", "packed", "flex", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="Tiny sizes on the CPU (tests the script only).")
    p.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="Prompt + response tokens per side.")
    p.add_argument("--prompt-len", type=int, default=128, help="Prompt tokens (fixed lengths).")
    p.add_argument("--attn", default="sdpa", help="attn_implementation of the padded paths.")
    p.add_argument(
        "--levers",
        default=",".join(LEVERS),
        help="comma-separated levers measured beside the plain step ('' for none): checkpointing "
        "(activation checkpointing), micro (twice the pairs per micro-batch), packed (random lengths: "
        "padded vs packed rows with sdpa, and flash_attention_2 when flash_attn is installed), flex "
        "(packed rows with flex_attention document masks; CUDA only), compile (torch.compile of the "
        "decoder, precompute and step)",
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compile lever."
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="Autocast dtype.")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--logps-chunk",
        type=int,
        default=LOGPS_CHUNK,
        help=f"linear_logps positions per chunk ({LOGPS_CHUNK}).",
    )
    p.add_argument(
        "--values-chunk",
        type=int,
        default=PrecomputeConfig().chunk_size,
        help="teacher_signals positions per chunk (default: PrecomputeConfig's).",
    )
    p.add_argument(
        "--tf32-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="On CUDA, also time the precompute with a TF32 head matmul (default on).",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="wall-clock budget: measurements not started by then are reported as skipped, so one "
        "call on a lent machine always ends with its tables and JSON",
    )
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-precompute", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--no-ref-forward", action="store_true", help="Skip the naive step with a reference forward."
    )
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", default=None, help="Write results here (default: $OUT/gpu.json when OUT is set)."
    )
    args = p.parse_args(argv)
    args.levers = [x for x in args.levers.split(",") if x]
    unknown = sorted(set(args.levers) - set(LEVERS))
    if unknown:
        p.error(f"--levers: unknown {unknown}; choose from {', '.join(LEVERS)}")
    if args.cpu_smoke:
        args.device = args.device or "cpu"
        args.pairs, args.seq_len, args.prompt_len = min(args.pairs, 2), min(args.seq_len, 64), 16
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
        args.dtype = "fp32"
    if not 1 <= args.prompt_len < args.seq_len:
        p.error("--prompt-len must be in [1, --seq-len)")
    return args


class Runner:
    """Times named paths under the wall-clock budget; a path that raises (a lever this software
    stack does not run) or comes after the budget becomes a row with the reason, not a crash."""

    def __init__(self, args: argparse.Namespace, device: torch.device, start: float):
        self.args, self.device, self.deadline = args, device, start + args.budget_s

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.deadline - time.perf_counter()

    def __call__(
        self, name: str, factory, batch: Batch, flops_per_token: float, *, needs_s: float = 0.0
    ) -> Measure:
        """`needs_s`: start only with that much budget left (a compilation takes minutes)."""
        if self.left() < max(needs_s, 0.0) or self.left() <= 0:
            return Measure(name, [], batch.n_tokens, flops_per_token, None, error="skipped: --budget-s spent")
        try:
            fn = factory()
            return measure(
                name,
                fn,
                tokens=batch.n_tokens,
                flops_per_token=flops_per_token,
                device=self.device,
                args=self.args,
            )
        except Exception as exc:  # reported in the table and the JSON
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            return Measure(
                name, [], batch.n_tokens, flops_per_token, None, error=f"{type(exc).__name__}: {first}"
            )
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _with(ctx_factory, factory):
    """A step factory whose every call runs inside a fresh `ctx_factory()` context."""

    def build():
        fn = factory()

        def run():
            with ctx_factory():
                fn()

        return run

    return build


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    peak = args.peak_tflops if on_gpu else None
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    shape = SMOKE if args.cpu_smoke else QWEN2_05B
    results: dict = {"environment": environment_line(str(device)), "args": vars(args).copy()}
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu.json") if os.environ.get("OUT") else None)

    def save() -> None:  # after every section, so a killed run still leaves what it measured
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(results, indent=2, default=str))

    print(environment_line(str(device)))
    failed = False
    check_rows = ["check", "max abs err", "max rel err", "tolerance", "result"]

    if not args.skip_correctness:
        positions = 64 if args.cpu_smoke else 512
        checks = run_correctness(
            device,
            vocab=shape["vocab_size"],
            hidden=shape["hidden_size"],
            positions=positions,
            seed=args.seed,
        )
        print(f"\n## Correctness on {device} vs float64 CPU reference\n")
        print(markdown_table(check_rows, [c.row() for c in checks]))
        results["correctness"] = [c.__dict__ for c in checks]
        failed = not all(c.ok for c in checks if "(info)" not in c.name)
        save()

    if args.skip_precompute and args.skip_train:
        return _finish(failed, out, save)
    model = build_model(args, device)
    n_flop = flop_params(model)
    kw = dict(
        seq_len=args.seq_len, prompt_len=args.prompt_len, vocab=shape["vocab_size"],
        device=device, seed=args.seed,
    )  # fmt: skip
    batch = make_batch(pairs=args.pairs, lengths="fixed", packing=False, **kw)
    timed = Runner(args, device, start)
    compile_ = "compile" in args.levers

    # a compilation of the 0.5B decoder (forward, or forward + backward) takes one to two minutes
    compile_s = 0.0 if args.cpu_smoke else 150.0

    def compiled_decoder():
        return torch.compile(model.get_decoder(), backend=args.compile_backend)

    # The naive DPO step's frozen reference: a copy of the initial weights (bf16 under bf16
    # autocast: a frozen model needs no fp32 master copy), parked on the CPU until its own
    # measurement, so it weighs on no other path's peak memory.
    want_ref = not (args.skip_train or args.skip_naive or args.no_ref_forward)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False).cpu() if want_ref else None
    if ref_model is not None and dtype is not None:
        ref_model.to(dtype)
    desc = (
        f"{args.pairs} pairs x {args.seq_len} tokens (prompt {args.prompt_len}), "
        f"{batch.n_tokens} tokens/step of which {int(batch.resp_lens.sum())} response; "
        f"N = {n_flop / 1e6:.2f}M FLOP-params; "
        f"autocast {args.dtype}; attn {args.attn}; levers {','.join(args.levers) or 'none'}"
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel: Qwen2-shaped, {n_params / 1e6:.2f}M parameters; {desc}")
    results["setup"] = desc

    if not args.skip_precompute:
        model.eval()
        pre: list[Measure] = []
        naive_pre = "naive precompute (full logits)"
        with _matmul_precision("highest"):
            pre.append(
                timed(
                    "tvkd precompute (exact head)",
                    lambda: make_precompute_ours(model, batch, args, dtype),
                    batch,
                    2 * n_flop,
                )
            )
            if not args.skip_naive:
                pre.append(
                    timed(naive_pre, lambda: make_precompute_naive(model, batch, dtype), batch, 2 * n_flop)
                )
            if compile_:
                pre.append(
                    timed(
                        "tvkd precompute (exact head) + torch.compile",
                        lambda: make_precompute_ours(model, batch, args, dtype, compiled_decoder()),
                        batch,
                        2 * n_flop,
                        needs_s=compile_s,
                    )
                )
        if args.tf32_head and on_gpu:
            with _matmul_precision("high"):
                pre.append(
                    timed(
                        "tvkd precompute (TF32 head)",
                        lambda: make_precompute_ours(model, batch, args, dtype),
                        batch,
                        2 * n_flop,
                    )
                )
        print("\n## Precompute (teacher forward + values and token log-probs)\n")
        print(table(pre, naive_pre, peak))
        results["precompute"] = [m.to_dict(peak) for m in pre]
        save()

    if not args.skip_train:
        model.train()

        def adamw() -> torch.optim.Optimizer:
            # fused AdamW is the fast CUDA path; the CPU smoke keeps the default implementation
            return torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True if on_gpu else None)

        def ours(b: Batch, decoder_factory=None):
            return lambda: make_train_ours(
                model, b, args, dtype, adamw(), decoder_factory() if decoder_factory else None
            )

        tr: list[Measure] = []
        naive_pre_ref = "naive DPO step (full logits, precomputed ref)"
        naive_fwd_ref = "naive DPO step (full logits, ref forward)"
        tr.append(timed("tvkd step (fused logps, precomputed ref)", ours(batch), batch, 6 * n_flop))
        if not args.skip_naive:
            tr.append(
                timed(
                    naive_pre_ref,
                    lambda: make_train_naive(model, batch, args, dtype, adamw()),
                    batch,
                    6 * n_flop,
                )
            )
            if ref_model is not None:
                ref_model.to(device)
                # model FLOPs: 6·N for the policy step + 2·N for the reference forward
                tr.append(
                    timed(
                        naive_fwd_ref,
                        lambda: make_train_naive(model, batch, args, dtype, adamw(), ref_model=ref_model),
                        batch,
                        8 * n_flop,
                    )
                )
                ref_model.cpu()
        if "checkpointing" in args.levers:
            tr.append(
                timed(
                    "tvkd step + activation checkpointing",
                    _with(lambda: _checkpointing(model), ours(batch)),
                    batch,
                    6 * n_flop,
                )
            )
        if "micro" in args.levers:
            big = make_batch(pairs=2 * args.pairs, lengths="fixed", packing=False, **kw)
            tr.append(timed(f"tvkd step, micro batch {2 * args.pairs} pairs", ours(big), big, 6 * n_flop))
            if "checkpointing" in args.levers:
                tr.append(
                    timed(
                        f"tvkd step, micro batch {2 * args.pairs} pairs + checkpointing",
                        _with(lambda: _checkpointing(model), ours(big)),
                        big,
                        6 * n_flop,
                    )
                )
            del big
        if compile_ and timed.left() >= compile_s:
            try:
                check = check_compiled(
                    model, batch, compiled_decoder(), name="compiled = eager log-probs, fp32"
                )
                print("\n" + markdown_table(check_rows, [check.row()]))
                results.setdefault("correctness", []).append(check.__dict__)
                failed = failed or not check.ok
            except Exception as exc:  # the timed row below reports the same failure
                print(f"\ntorch.compile check: {type(exc).__name__}: {exc}"[:300])
            tr.append(
                timed(
                    "tvkd step + torch.compile",
                    ours(batch, compiled_decoder),
                    batch,
                    6 * n_flop,
                    needs_s=compile_s,
                )
            )
        elif compile_:
            tr.append(
                Measure(
                    "tvkd step + torch.compile",
                    [],
                    batch.n_tokens,
                    6 * n_flop,
                    None,
                    error="skipped: --budget-s spent",
                )
            )
        baseline = naive_fwd_ref if any(m.name == naive_fwd_ref and m.times for m in tr) else naive_pre_ref
        print(
            f"\n## Training step (forward + backward + AdamW), {args.pairs} pairs x {args.seq_len} tokens\n"
        )
        print(table(tr, baseline, peak))
        results["train"] = [m.to_dict(peak) for m in tr]
        save()

        if "packed" in args.levers or "flex" in args.levers:
            failed = _packing_section(model, args, kw, timed, ours, n_flop, peak, results, save) or failed

    return _finish(failed, out, save)


def _packing_section(model, args, kw, timed, ours, n_flop, peak, results, save) -> bool:
    """Random lengths: the padded step against packed rows (no padding), per attention kernel,
    each packed layout first checked against the padded log-probs."""
    device = kw["device"]
    padded = make_batch(pairs=args.pairs, lengths="random", packing=False, **kw)
    packed = make_batch(pairs=args.pairs, lengths="random", packing=True, **kw)
    kernels = []
    if "packed" in args.levers:
        kernels.append("sdpa")
        if importlib.util.find_spec("flash_attn") is not None and device.type == "cuda":
            kernels.append("flash_attention_2")
    if "flex" in args.levers and device.type == "cuda":
        kernels.append("flex_attention")
    base = "tvkd step, random lengths, padded"
    rows: list[Measure] = [timed(base, ours(padded), padded, 6 * n_flop)]
    checks: list[Check] = []
    failed = False
    for kernel in kernels:
        name = f"tvkd step, random lengths, packed ({kernel})"
        try:
            with _attn(model, kernel):
                checks.append(
                    check_packing(model, args, kw["vocab"], device, name=f"packed = padded, {kernel}")
                )
        except Exception as exc:  # a kernel this stack lacks: reported, not fatal
            rows.append(
                Measure(
                    name, [], packed.n_tokens, 6 * n_flop, None, error=f"{type(exc).__name__}: {exc}"[:160]
                )
            )
            continue
        failed = failed or not checks[-1].ok
        rows.append(
            timed(
                name,
                _with(lambda kernel=kernel: _attn(model, kernel), ours(packed)),
                packed,
                6 * n_flop,
                needs_s=60.0 if kernel == "flex_attention" else 0.0,  # flex compiles its kernels
            )
        )
    print(
        f"\n## Packing: {args.pairs} pairs of random lengths ≤ {args.seq_len}, {padded.n_tokens} real tokens "
        f"(padded grid {padded.input_ids.numel()} positions)\n"
    )
    if checks:
        print(
            markdown_table(
                ["check", "max abs err", "max rel err", "tolerance", "result"], [c.row() for c in checks]
            )
            + "\n"
        )
    print(table(rows, base, peak))
    results["packing"] = {"checks": [c.__dict__ for c in checks], "rows": [m.to_dict(peak) for m in rows]}
    save()
    return failed


def _finish(failed: bool, out: str | None, save) -> int:
    save()
    if out:
        print(f"\nwrote {out}")
    if failed:
        print("\nCORRECTNESS FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
