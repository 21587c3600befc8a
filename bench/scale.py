"""Scale-out on CPU: 2 processes (DDP, FSDP2; torchrun, gloo) against 1, on a tiny Llama.

Each run trains the same student on the same arithmetic preference pairs with the same
effective batch (batch_size × grad_accum pairs per optimizer step) through `tvkd.trainer.Trainer`
(the library path `tvkd train` takes, here without the CLI around it), and reports:

- wall time per optimizer step: the median of the steps' wall times on rank 0 (the first,
  warm-up step is left out), from the trainer's progress callback;
- bytes moved per step per rank, estimated from the trainable parameters' float32 bytes G
  (gradients have the same size) with N processes and m micro-batches per rank per step:
    DDP   ring all-reduce of the gradients once per step:  2·(N−1)/N · G
    FSDP  all-gather of the parameters in each micro-batch's forward and again in its backward
          (reshard after forward), reduce-scatter of the gradients once per step:
          (2m + 1)·(N−1)/N · G
  (estimates of the collectives' payload, not a packet count);
- equality: max |Δ| of the final weights and of the per-step losses against one process.

    python bench/scale.py                 # 1 process, then DDP and FSDP on 2 (CPU, gloo)
    python bench/scale.py --gpu           # tokens/s of one process on one GPU (needs CUDA)
    python bench/scale.py --smoke         # seconds; checks the script only

Writes bench/results/scale.json (or --out). On this CPU machine (2 cores shared) two processes
are not expected to be faster: the table shows the overhead and that the results are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def arithmetic_rows(n: int) -> list[dict[str, str]]:
    """The tests' learnable task: "Q: a+b=" → the right sum (chosen), a near miss (rejected)."""
    rows = []
    for k in range(n):
        a, b = k % 10, (k * 7) % 10
        rows.append({"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 1 + k % 2}"})
    return rows


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Models, data and the teacher's value store, made once for every run."""
    from tvkd.config import PrecomputeConfig
    from tvkd.data import load_pairs
    from tvkd.model_prep import build_tiny_model
    from tvkd.precompute import precompute_values

    size = {"hidden_size": args.hidden, "num_layers": args.layers, "intermediate_size": 2 * args.hidden}
    student = build_tiny_model(work / "student", seed=0, **size)
    teacher = build_tiny_model(work / "teacher", seed=1, **size)
    data = work / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in arithmetic_rows(args.pairs)) + "\n")
    pairs, _ = load_pairs(str(data))
    precompute_values(str(teacher), pairs, PrecomputeConfig(max_length=64), store_root=work / "stores")
    return {
        "student": str(student),
        "teacher": str(teacher),
        "data": str(data),
        "stores": str(work / "stores"),
    }


def worker(spec: dict[str, Any]) -> None:
    """One run (in each torchrun process): train, time the steps on rank 0, write a JSON."""
    import torch

    from tvkd import distributed
    from tvkd.callbacks import Callbacks
    from tvkd.config import PrecomputeConfig, TrainConfig
    from tvkd.data import load_pairs
    from tvkd.precompute import precompute_values
    from tvkd.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    ctx = distributed.init()
    pairs, _ = load_pairs(spec["data"])
    store = precompute_values(
        spec["teacher"], pairs, PrecomputeConfig(max_length=64), store_root=spec["stores"]
    )
    times: list[float] = []

    class Clock(Callbacks):
        last = time.perf_counter()

        def on_progress(self, stage: str, done: int, total: int, eta: float | None) -> None:
            if stage == "train":
                now = time.perf_counter()
                times.append(now - Clock.last)
                Clock.last = now

        def on_stage(self, stage: str, info: dict[str, Any]) -> None:
            Clock.last = time.perf_counter()

    config = TrainConfig.from_dict({**spec["train"], "parallel": spec["parallel"]})
    n = len(pairs)
    trainer = Trainer(
        config,
        student=spec["student"],
        teacher=spec["teacher"],
        pairs=pairs,
        train_idx=range(n),
        eval_idx=[],
        store=store.store,
        output_dir=spec["out"],
        device=spec["device"],
        callbacks=Clock(),
    )
    trainer.setup()
    result = trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if ctx.enabled and trainer.par.mode == "fsdp":  # the local shard's count under FSDP
        trainable = sum(int(p.full_tensor().numel()) for p in trainer.params)  # type: ignore[attr-defined]
    trainer.cleanup()
    if ctx.is_main:
        losses = {h["step"]: h["loss"] for h in result.history if h["split"] == "train"}
        record = {"times": times, "losses": losses, "params": trainable, "tokens": trainer.tokens_seen}
        record["tokens_per_second"] = result.tokens_per_second
        Path(spec["out"], "bench.json").write_text(json.dumps(record))
    distributed.destroy()


def launch(spec: dict[str, Any], nproc: int) -> dict[str, Any]:
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    spec_path = Path(spec["out"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    me = [str(Path(__file__).resolve()), "--worker", str(spec_path)]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc)]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *me]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    record = json.loads((Path(spec["out"]) / "bench.json").read_text())
    record["process_seconds"] = time.perf_counter() - t0
    return record


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def bytes_per_step(mode: str, params: int, world: int, micro_per_rank: int) -> float:
    """The module docstring's estimate (float32 parameters and gradients)."""
    g = 4.0 * params
    if world == 1:
        return 0.0
    share = (world - 1) / world
    return 2 * share * g if mode == "ddp" else (2 * micro_per_rank + 1) * share * g


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="tokens/s of one process on one GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny and few steps: checks the script")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tvkd-bench-scale"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return
    if args.smoke:
        args.hidden, args.layers, args.pairs, args.steps = 64, 2, 32, 3
    import torch

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available on this machine (no GPU measured)")
    work = Path(args.work)
    made = prepare(work, args)
    train = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_steps": args.steps}
    train |= {"learning_rate": 1e-3, "max_length": 64, "num_samples": 0}
    base = {**made, "train": train, "threads": 1, "device": "cpu"}
    if args.gpu:
        record = launch(
            {**base, "device": "cuda", "threads": 4, "parallel": "auto", "out": str(work / "gpu")}, 1
        )
        print(f"1 GPU ({torch.cuda.get_device_name(0)}): {record['tokens_per_second']:.0f} tokens/s")
        Path(args.out).with_name("scale_gpu.json").write_text(json.dumps(record, indent=1))
        return
    runs = [("one process", "auto", 1), ("DDP, 2 processes", "ddp", 2), ("FSDP2, 2 processes", "fsdp", 2)]
    rows = []
    for label, mode, nproc in runs:
        out = work / f"{mode}-{nproc}"
        print(f"running {label} ...", flush=True)
        record = launch({**base, "parallel": mode, "out": str(out)}, nproc)
        steps = record["times"][1:] or record["times"]
        micro = -(-args.grad_accum // nproc)
        rows.append(
            {
                "run": label,
                "processes": nproc,
                "step_seconds_median": statistics.median(steps),
                "bytes_per_step_per_rank": bytes_per_step(mode, record["params"], nproc, micro),
                "params": record["params"],
                "losses": record["losses"],
                "out": str(out),
            }
        )
    one = rows[0]
    for row in rows:
        row["max_abs_weight_diff"] = max_diff(Path(one["out"]), Path(row["out"]))
        row["max_abs_loss_diff"] = max(abs(row["losses"][k] - one["losses"][k]) for k in one["losses"])
    header = (
        f"{'run':<20} {'s/step (median)':>15} {'MB moved/step/rank':>19} {'max |Δw|':>9} {'max |Δloss|':>11}"
    )
    print(header)
    for r in rows:
        mb = r["bytes_per_step_per_rank"] / 1e6
        print(
            f"{r['run']:<20} {r['step_seconds_median']:>15.3f} {mb:>19.2f} "
            f"{r['max_abs_weight_diff']:>9.1e} {r['max_abs_loss_diff']:>11.1e}"
        )
    setup = {k: getattr(args, k) for k in ("hidden", "layers", "pairs", "steps", "batch_size", "grad_accum")}
    result = {"setup": setup, "torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
