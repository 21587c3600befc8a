"""`tvkd train`: one TVKD job on this machine (no server): validate → precompute → train.

Every TrainConfig, MethodConfig and JobOptions field is a flag generated from the dataclasses,
with their help strings and ranges (`--alpha 0.7 --value-beta 2 --batch-size 16 --lora --limit
100 ...`). Settings are layered: dataclass defaults < `--config cfg.json` (flat or
{"method": {...}}) < flags.

The first Ctrl-C asks the job to stop after the current step (a checkpoint is written, and
`--resume`, the default, continues from it next time); a second one aborts at once.
Exit codes: 0 completed, 1 bad data/model/settings, 2 usage, 130 stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvkd.config import (
    ConfigError,
    JobOptions,
    JobSpec,
    MethodConfig,
    TrainConfig,
    config_fields,
    require_teacher_reference,
)
from tvkd.numerics import NonFiniteError

if TYPE_CHECKING:
    from tvkd.trackers import TrackerSettings

SHAPING_ACCURACY = "tvkd/shaping_accuracy"


def add_config_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    aliases: dict[str, str] | None = None,
) -> None:
    """One `--flag` per dataclass field, typed, with choices, range and help from its declaration
    (`config_fields`); absent flags leave the namespace untouched (argparse.SUPPRESS), so only
    what the user typed overrides the config file. Values are checked by the dataclass itself."""
    for f in config_fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")] + [a for a in [(aliases or {}).get(f.name)] if a]
        allowed = f"{f.range_text()}; " if f.bounds else ""
        text = f"{f.help} ({allowed}default: {f.default})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.type == list[str]:
            kw.update(nargs="+", metavar="NAME")
            if f.choices is not None:
                kw.update(choices=f.choices, metavar=None)
        elif f.choices is not None:
            kw.update(type=str, choices=f.choices)
        else:
            kw.update(type=f.type, metavar=f.name.upper())
        parser.add_argument(*flags, **kw)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a student with TVKD (validate, precompute, train, evaluate)",
        description="Distil a DPO-trained teacher's values into a student on preference pairs. "
        "Writes OUTPUT/model (a plain Hugging Face folder), checkpoints, samples.json and result.json.",
    )
    job = p.add_argument_group("job")
    job.add_argument("--teacher", help="teacher model folder (not needed with --alpha 0)")
    job.add_argument("--student", required=True, help="student model folder (its initial weights are π_ref)")
    job.add_argument(
        "--data", required=True, help="preference data: JSONL(.gz)/JSON/Parquet or datasets folder"
    )
    job.add_argument("--output", required=True, help="output folder of the job")
    job.add_argument("--config", help="JSON file of TrainConfig settings (flat, or with a 'method' object)")
    job.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    job.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint in --output (default: yes)",
    )
    job.add_argument(
        "--store-root", help="value store root (default: $TVKD_ARTIFACT_ROOT/values, else ./.tvkd/values)"
    )
    job.add_argument(
        "--run-name", help="the run's name in the --report-to trackers (default: the output folder's name)"
    )
    job.add_argument(
        "--logging-dir",
        help="TensorBoard root of --report-to tensorboard (default: OUTPUT/runs); MLflow and W&B "
        "read MLFLOW_TRACKING_URI (default: a file store in OUTPUT/mlruns), MLFLOW_EXPERIMENT_NAME, "
        "WANDB_PROJECT, WANDB_MODE (default: offline) and WANDB_DIR (default: OUTPUT)",
    )
    add_config_flags(
        p.add_argument_group("job options (JobOptions)"), JobOptions, aliases={"eval_dataset": "--eval-data"}
    )
    add_config_flags(p.add_argument_group("TVKD method (MethodConfig)"), MethodConfig)
    add_config_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig, skip=("method",))
    p.set_defaults(func=run)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of a `--config` file. Raises ConfigError naming the file when it cannot be
    read, is not JSON, or is not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}", f"cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}", f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}", f"must hold a JSON object, not {type(data).__name__}")
    return data


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags (flags are flat; `TrainConfig.from_dict` merges them)."""
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    names = {f.name for cls in (MethodConfig, TrainConfig) for f in config_fields(cls)} - {"method"}
    # Only flags the user typed are in the namespace.
    return TrainConfig.from_dict({**data, **{k: v for k, v in vars(args).items() if k in names}})


def check_world(config: TrainConfig | Any) -> None:
    """`num_processes` (per node) and `num_nodes` above 1 name the torchrun world this run must be
    in (the CLI does not launch one): num_processes × num_nodes processes, num_processes on each
    node (torchrun's LOCAL_WORLD_SIZE). Raises ConfigError naming the field when the run differs."""
    import os

    from tvkd.distributed import context

    per_node, nodes = config.num_processes, config.num_nodes
    wanted, world = per_node * nodes, context().world_size
    if wanted == 1:
        return
    local_raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    local = int(local_raw) if local_raw.strip().isdigit() and int(local_raw) > 0 else world
    if world == wanted and local == per_node:
        return
    field = "num_processes" if nodes == 1 or world == wanted else "num_nodes"
    raise ConfigError(
        field,
        f"{per_node} process(es) per node on {nodes} node(s), {wanted} in all, asked for, but this "
        f"run has {world} process(es) on {max(1, world // local)} node(s): launch it as "
        f"`torchrun --nnodes {nodes} --nproc-per-node {per_node} -m tvkd.cli ...` (README 'Scaling')",
    )


def build_options(args: argparse.Namespace) -> JobOptions:
    names = {f.name for f in config_fields(JobOptions)}
    return JobOptions.from_dict({k: v for k, v in vars(args).items() if k in names})


def _device(name: str | None) -> str:
    """`name`, else cuda when available (under torchrun cuda:LOCAL_RANK), else cpu."""
    if name:
        return name
    import torch

    from tvkd import distributed

    if not torch.cuda.is_available():
        return "cpu"
    ctx = distributed.context()
    return f"cuda:{ctx.local_rank}" if ctx.enabled else "cuda"


def _table(train: dict[str, float], evaluation: dict[str, float], *, preference: bool = True) -> str:
    names = list(train) + [k for k in evaluation if k not in train]
    if preference and SHAPING_ACCURACY not in names:  # absent when the shaping is off or zero: say so
        names.append(SHAPING_ACCURACY)
    width = max(len(n) for n in names) if names else 10
    lines = [f"{'metric':<{width}}  {'train':>12}  {'eval':>12}"]
    for name in names:
        blank = "n/a" if name == SHAPING_ACCURACY else ""
        cells = [f"{d[name]:>12.4g}" if name in d else f"{blank:>12}" for d in (train, evaluation)]
        lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tvkd.cli.precompute import default_store_root
    from tvkd.config import JobSpec
    from tvkd.trackers import TrackerSettings

    try:
        config, options = build_config(args), build_options(args)
        require_teacher_reference(config.method, options)
        check_world(config)
    except (ConfigError, OSError, json.JSONDecodeError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = JobSpec(
        teacher=args.teacher,
        student=args.student,
        dataset=args.data,
        train=config,
        output_dir=args.output,
        store_root=str(args.store_root or default_store_root()),
        device=_device(args.device),
        options=options,
    )
    trackers = TrackerSettings.for_output(args.output, run_name=args.run_name, logging_dir=args.logging_dir)
    return execute(spec, resume=args.resume, trackers=trackers)


def execute(spec: JobSpec, *, resume: bool, trackers: TrackerSettings | None = None) -> int:
    """Run a job here with terminal progress (Ctrl-C stops after the step); print its metrics
    and files. The exit code of the module docstring."""
    from tvkd import distributed
    from tvkd.callbacks import PrintCallbacks
    from tvkd.data import DataError
    from tvkd.models import ModelError
    from tvkd.run_job import run_job

    # Under torchrun every rank runs the job (tvkd.parallel); rank 0 alone prints and writes.
    ctx = distributed.init()
    callbacks = PrintCallbacks()

    def on_sigint(signum: int, frame: Any) -> None:
        print("\nstopping after this step (a checkpoint is saved); Ctrl-C again aborts", file=sys.stderr)
        callbacks.stop()
        signal.signal(signal.SIGINT, previous)

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (e.g. called from a test runner's thread)
        previous = None
    try:
        result = run_job(spec, callbacks, resume=resume, trackers=trackers)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except NonFiniteError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    finally:
        callbacks.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        distributed.destroy()
    if not ctx.is_main:
        return 0 if result.status == "completed" else 130
    train, evaluation = result.train, result.evaluation
    if train is not None:
        print(_table(train.metrics, evaluation.metrics if evaluation else {}, preference=spec.kind != "sft"))
        print(
            f"steps:      {train.steps} of {train.total_steps} in {train.seconds:.1f}s "
            f"({train.tokens_per_second:.0f} tokens/s)"
        )
        for label, path in (
            ("model", train.model_dir),
            ("adapter", train.adapter_dir),
            ("checkpoint", train.checkpoint),
            ("samples", evaluation.samples_path if evaluation else None),
        ):
            if path:
                print(f"{label + ':':<11} {path}")
    check = result.precompute.teacher_check if result.precompute is not None else None
    if check is not None:
        print(f"{'teacher:':<11} {check.message()}")
    print(f"{'result:':<11} {result.result_path}")
    print(f"{'status:':<11} {result.status}")
    return 0 if result.status == "completed" else 130
