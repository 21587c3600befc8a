"""Replication benchmark: does the teacher's value shaping make a better student, on a gold measure?

    python bench/replicate.py                 # the full benchmark on CPU (~40 min on 2 cores)
    python bench/replicate.py --quick         # a few methods, 2 seeds, small world (~1 min)
    python bench/replicate.py --scale gpu     # bigger models and more data, on a lent GPU
    python bench/replicate.py --split dev     # report the dev split (for choosing settings)

The whole pipeline of the paper, in-process, on the verifiable task world of `tvkd.taskworld`
(char-level add / sort / reverse; demonstrations carry a wrong procedure 40% of the time):
teacher SFT on demonstrations → teacher DPO on preference pairs → student SFT on demonstrations
(the student's start, one per seed) → the student trained on preference pairs by each method.
Every preference objective is the library's `tvkd_loss` (bench/_replicate_model.py). Gold = the
greedy answer passes the checker, on held-out prompts. Seeds change the student's
initialisation and data order (the world and the teacher are fixed). Each method is compared to
DPO on the same seeds (paired differences, 95% t intervals, paired t-test, Holm-corrected over
all comparisons), and to the SFT start. The teacher's shaping accuracy (Σψ(y_w) > Σψ(y_l) on the
student's training pairs, 95% Wilson interval) is reported per value source.

Writes replicate.json and replicate.png to --out (default $OUT or runs/replicate) and prints
the tables (markdown). Settings are chosen on the dev split; the test split is reported.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _replicate_model as rm
import _replicate_report as report
import _replicate_signals as sig
from _common import environment_line

from tvkd import taskworld as tw


@dataclass(frozen=True)
class Scale:
    sizes: dict[str, int]
    teacher: tuple[int, int, int]  # d_model, layers, heads
    student: tuple[int, int, int]
    teacher_sft_steps: int
    teacher_dpo_steps: int
    student_sft_steps: int
    pref_steps: int
    batch: int
    sft_lr: float
    pref_lr: float
    seeds: int
    wrong_rate: float = 0.4
    pairs_per_prompt: int = 4
    beta: float = 0.1  # DPO β of the teacher and the student; β_v of `implicit` equals it


SPLITS = ("teacher_sft", "teacher_pref", "student_sft", "student_pref", "dev", "test")


def _scale(
    sizes: tuple[int, ...],
    teacher: tuple[int, int, int],
    student: tuple[int, int, int],
    steps: tuple[int, int, int, int],
    batch: int,
    lr: tuple[float, float],
    seeds: int,
) -> Scale:
    """A row of SCALES (the columns are named in its comment)."""
    return Scale(dict(zip(SPLITS, sizes, strict=True)), teacher, student, *steps, batch, *lr, seeds)


# fmt: off
SCALES: dict[str, Scale] = {
    # split sizes (SPLITS), teacher and student (d_model, layers, heads), steps (teacher SFT,
    # teacher DPO, student SFT, preference), batch, learning rates (SFT, preference), seeds
    "cpu":   _scale((6000, 1500, 3000, 600, 400, 800), (96, 3, 4), (48, 2, 4),
                    (1500, 400, 1000, 300), 32, (3e-3, 1e-3), 5),
    "quick": _scale((1500, 300, 800, 150, 100, 150), (48, 2, 4), (32, 1, 4),
                    (300, 60, 150, 40), 16, (3e-3, 1e-3), 2),
    "gpu":   _scale((40000, 8000, 20000, 4000, 1000, 2000), (256, 6, 8), (96, 3, 4),
                    (6000, 1500, 2000, 1200), 64, (1e-3, 5e-4), 10),
}
# fmt: on


@dataclass(frozen=True)
class Method:
    """One student training recipe: the `tvkd_loss` options, λ of the NLL term, the teacher used."""

    name: str
    alpha: float = 0.0
    shaping: str = "none"
    gamma: float = 1.0
    terminal: str = "model"
    q_source: str = "logits"
    sft_weight: float = 0.0
    dpo: bool = True  # False: the NLL term alone (SFT-only)
    teacher: str = "dpo"  # "dpo" (SFT then DPO-trained) or "sft" (the weak teacher)
    noise: float = 0.0  # Gaussian noise on V, in units of the clean per-pair offset's std

    def loss_options(self, beta: float) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": beta,
            "gamma": self.gamma,
            "terminal": self.terminal,
            "shaping": self.shaping,
            "value_beta": beta if self.q_source == "implicit" else 1.0,
        }


def _with_sft(methods: list[Method]) -> list[Method]:
    return [replace(m, name=f"{m.name} +sft", sft_weight=1.0) for m in methods]


def all_methods() -> list[Method]:
    core = [
        Method("DPO"),
        Method("TVKD α0.3", alpha=0.3, shaping="value"),
        Method("TVKD α0.7", alpha=0.7, shaping="value"),
        Method("TVKD α1.5", alpha=1.5, shaping="value"),
        Method("TVKD γ0.9", alpha=0.7, shaping="value", gamma=0.9),
        Method("pre_eos", alpha=0.7, shaping="value", terminal="pre_eos"),
        Method("implicit", alpha=0.7, shaping="value", q_source="implicit"),
        Method("logprob (action)", alpha=0.7, shaping="logprob"),
    ]
    open_questions = [
        Method("weak teacher TVKD α0.7 +sft", alpha=0.7, shaping="value", sft_weight=1.0, teacher="sft"),
        Method(
            "weak teacher pre_eos +sft",
            alpha=0.7,
            shaping="value",
            terminal="pre_eos",
            sft_weight=1.0,
            teacher="sft",
        ),
        Method(
            "implicit noise 1× +sft",
            alpha=0.7,
            shaping="value",
            q_source="implicit",
            sft_weight=1.0,
            noise=1.0,
        ),
        Method(
            "implicit noise 3× +sft",
            alpha=0.7,
            shaping="value",
            q_source="implicit",
            sft_weight=1.0,
            noise=3.0,
        ),
    ]
    return [Method("SFT-only", sft_weight=1.0, dpo=False), *core, *_with_sft(core), *open_questions]


QUICK_METHODS = ("SFT-only", "DPO", "TVKD α0.7", "implicit +sft")


# --------------------------------------------------------------------------------------------
# The pipeline, in worker processes (one torch thread each)

_CTX: dict[str, Any] = {}


def _init_worker(ctx: dict[str, Any]) -> None:
    torch.set_num_threads(ctx["threads"])
    _CTX.clear()
    _CTX.update(ctx)
    _CTX["world"] = tw.make_world(ctx["world_seed"], ctx["scale"].sizes)


def _model(shape: tuple[int, int, int], state: dict | None = None) -> rm.TinyGPT:
    m = rm.TinyGPT(*shape)
    if state is not None:
        m.load_state_dict(state)
    return m.to(_CTX["device"])


def build_teacher(scale: Scale, world: tw.World, device: str) -> dict[str, Any]:
    """Teacher SFT on demonstrations, then DPO (the library's loss, α 0) from that SFT model."""
    torch.manual_seed(10_000 + world.seed)
    teacher = rm.TinyGPT(*scale.teacher).to(device)
    t0 = time.perf_counter()
    rows = tw.demos(world.teacher_sft, wrong_rate=scale.wrong_rate, seed=world.seed + 1)
    rm.sft(teacher, rows, steps=scale.teacher_sft_steps, lr=scale.sft_lr, batch=2 * scale.batch, seed=1)
    sft_state = copy.deepcopy(teacher.state_dict())
    data = sig.pref_data(
        teacher, tw.pairs(world.teacher_pref, per_prompt=scale.pairs_per_prompt, seed=world.seed + 2)
    )
    rm.pref_train(
        teacher,
        data,
        steps=scale.teacher_dpo_steps,
        lr=scale.pref_lr,
        batch=scale.batch,
        seed=2,
        loss_options=Method("DPO").loss_options(scale.beta),
    )
    weak = rm.TinyGPT(*scale.teacher).to(device)
    weak.load_state_dict(sft_state)
    return {
        "dpo": teacher,
        "sft": weak,
        "params": rm.n_params(teacher),
        "seconds": time.perf_counter() - t0,
        "gold": {
            "sft": {s: rm.gold_accuracy(weak, world.split(s)) for s in ("dev", "test")},
            "dpo": {s: rm.gold_accuracy(teacher, world.split(s)) for s in ("dev", "test")},
        },
    }


def cached_teacher(scale: Scale, world: tw.World, device: str, cache: Path | None) -> dict[str, Any]:
    """`build_teacher`, or its saved result from `cache` when one was built with the same world
    and teacher settings (for repeated runs while choosing settings; off by default)."""
    if cache is None:
        return build_teacher(scale, world, device)
    keep = ("sizes", "teacher", "teacher_sft_steps", "teacher_dpo_steps", "batch", "sft_lr", "pref_lr")
    key = {k: getattr(scale, k) for k in (*keep, "wrong_rate", "pairs_per_prompt", "beta")}
    digest = hashlib.sha256(json.dumps([key, world.seed], sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"teacher-{digest}.pt"
    if path.is_file():
        saved = torch.load(path, map_location=device)
        for name in ("dpo", "sft"):
            model = rm.TinyGPT(*scale.teacher).to(device)
            model.load_state_dict(saved[name])
            saved[name] = model.eval()
        print(f"teacher loaded from {path}", flush=True)
        return saved
    built = build_teacher(scale, world, device)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({**built, "dpo": built["dpo"].state_dict(), "sft": built["sft"].state_dict()}, path)
    return built


def student_start(seed: int) -> dict[str, Any]:
    """The student's SFT start for one seed: its weights and gold accuracy."""
    scale, world = _CTX["scale"], _CTX["world"]
    torch.manual_seed(seed)
    student = _model(scale.student)
    rows = tw.demos(world.student_sft, wrong_rate=scale.wrong_rate, seed=world.seed + 3)
    rm.sft(student, rows, steps=scale.student_sft_steps, lr=scale.sft_lr, batch=2 * scale.batch, seed=seed)
    gold = {s: rm.gold_accuracy(student, world.split(s)) for s in ("dev", "test")}
    return {"seed": seed, "state": {k: v.cpu() for k, v in student.state_dict().items()}, "gold": gold}


def run_method(seed: int, method: Method, start_state: dict) -> dict[str, Any]:
    """One student run: the start's weights trained on the preference pairs by `method`."""
    scale, world = _CTX["scale"], _CTX["world"]
    t0 = time.perf_counter()
    student = _model(scale.student, start_state)
    data = sig.pref_data(student, _CTX["pairs"], signals=_CTX["signals"], method=method, seed=seed)
    metrics = rm.pref_train(
        student,
        data,
        steps=scale.pref_steps,
        lr=scale.pref_lr,
        batch=scale.batch,
        seed=seed,
        loss_options=method.loss_options(scale.beta),
        sft_weight=method.sft_weight,
        dpo=method.dpo,
    )
    gold = {s: rm.gold_accuracy(student, world.split(s)) for s in ("dev", "test")}
    return {
        "seed": seed,
        "method": method.name,
        "gold": gold,
        "metrics": metrics,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished workers: what a quiet machine
    would need, whatever else ran beside it."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _commit() -> str:
    """The checkout's commit (with "+changes" when the work tree differs), for the record."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tvkd", "bench"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return (
        head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
        if head.returncode == 0
        else "unknown"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a few methods, 2 seeds, a small world (a test runs it)"
    )
    ap.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--seeds", type=int, default=None, help="student seeds (default: the scale's)")
    ap.add_argument("--methods", nargs="*", default=None, help="method names to run (default: all)")
    ap.add_argument("--split", choices=("dev", "test"), default="test", help="the split the tables report")
    ap.add_argument("--workers", type=int, default=2, help="processes, one torch thread each (CPU)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override a scale setting")
    ap.add_argument("--cache", type=Path, default=None, help="reuse a teacher built with the same settings")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/replicate"))
    args = ap.parse_args(argv)

    scale = SCALES["quick" if args.quick else args.scale]
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Scale.__dataclass_fields__ or key == "sizes" or not value:
            ap.error(f"--set {item!r}: give FIELD=VALUE, FIELD one of {sorted(asdict(scale))} but sizes")
        current = getattr(scale, key)
        scale = replace(
            scale,
            **{
                key: type(current)(value)
                if not isinstance(current, tuple)
                else tuple(int(x) for x in value.split(","))
            },
        )
    device = "cuda" if args.scale == "gpu" and torch.cuda.is_available() else "cpu"
    workers = 1 if device == "cuda" else max(1, args.workers)
    seeds = list(range(args.seeds or scale.seeds))
    methods = all_methods()
    wanted = args.methods or (list(QUICK_METHODS) if args.quick else None)
    if wanted:
        unknown = sorted(set(wanted) - {m.name for m in methods})
        if unknown:
            ap.error(f"unknown methods {unknown}; choose from {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in wanted]
    if "DPO" not in {m.name for m in methods}:
        methods.insert(0, Method("DPO"))  # every comparison is against DPO on the same seeds
    skipped = {m.name: why for m in methods if (why := sig.missing_feature(m))}
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", flush=True)
    methods = [m for m in methods if m.name not in skipped]

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    if device == "cpu":
        torch.set_num_threads(
            1
        )  # more threads than free cores spin-wait: 2 threads ran 20× slower under load
    print(environment_line(device), flush=True)
    world = tw.make_world(args.world_seed, scale.sizes)
    teachers = cached_teacher(scale, world, device, args.cache)
    print(
        f"teacher {teachers['params']:,} params built in {teachers['seconds']:.0f}s: gold "
        f"{teachers['gold']['sft'][args.split]:.1%} after SFT, "
        f"{teachers['gold']['dpo'][args.split]:.1%} after DPO",
        flush=True,
    )
    pairs = tw.pairs(world.student_pref, per_prompt=scale.pairs_per_prompt, seed=world.seed + 4)
    signals = sig.teacher_signals(teachers, pairs, beta=scale.beta)
    ctx = {
        "scale": scale,
        "world_seed": args.world_seed,
        "device": device,
        "threads": 1 if device == "cpu" else torch.get_num_threads(),
        "pairs": pairs,
        "signals": signals,
    }
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
        starts = {r["seed"]: r for r in pool.map(student_start, seeds)}
        print(f"student starts ready ({time.perf_counter() - t_start:.0f}s)", flush=True)
        jobs = [(s, m) for m in methods for s in seeds]
        futures = [pool.submit(run_method, s, m, starts[s]["state"]) for s, m in jobs]
        runs = []
        for i, f in enumerate(futures):
            runs.append(f.result())
            if (i + 1) % max(1, len(futures) // 10) == 0:
                print(f"  {i + 1}/{len(futures)} runs ({time.perf_counter() - t_start:.0f}s)", flush=True)

    result = report.summarise(
        scale=asdict(scale),
        methods=[asdict(m) for m in methods],
        split=args.split,
        teacher=teachers,
        student_params=rm.n_params(rm.TinyGPT(*scale.student)),
        starts={s: r["gold"] for s, r in starts.items()},
        runs=runs,
        skipped=skipped,
        accuracy=sig.shaping_accuracy(signals, pairs),
        wall_s=time.perf_counter() - t_start,
        cpu_s=_cpu_seconds(),
        load=(load0, os.getloadavg()),
        commit=_commit(),
        command=" ".join(["python bench/replicate.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicate.json").write_text(json.dumps(report.json_ready(result), indent=2, allow_nan=False))
    report.plot(result, args.out / "replicate.png")
    print(report.tables(result))
    print(f"\nwrote {args.out / 'replicate.json'} and {args.out / 'replicate.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
