"""`tvkd sft`: supervised fine-tuning on this machine (no server): validate → train.

Makes the teacher's SFT model and the student's initialisation of the paper's pipeline. The
data are prompt/completion rows or preference rows (their chosen responses); every SFTConfig
field and the job options are flags (`--learning-rate 1e-4 --epochs 2 --lora --limit 100 ...`),
layered as in `tvkd train`: dataclass defaults < `--config cfg.json` < flags. Ctrl-C stops after
the current step with a checkpoint (`--resume`, the default, continues from it); exit codes as
`tvkd train`: 0 completed, 1 bad data/model/settings, 2 usage, 130 stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tvkd.cli.train import _device, add_config_flags, build_options, check_world, execute, read_config_file
from tvkd.config import NOT_SFT_OPTIONS, ConfigError, JobOptions, JobSpec, SFTConfig, config_fields


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on chosen responses or prompt/completion rows",
        description="Fine-tune a model on the completions of prompt/completion rows, or on the chosen "
        "responses of preference rows (mean NLL of the response tokens). Writes OUTPUT/model (a plain "
        "Hugging Face folder), checkpoints and result.json.",
    )
    job = p.add_argument_group("job")
    job.add_argument("--student", "--model", required=True, help="model folder to fine-tune")
    job.add_argument(
        "--data",
        required=True,
        help="prompt/completion or preference rows: JSONL(.gz)/JSON/Parquet or datasets folder",
    )
    job.add_argument("--output", required=True, help="output folder of the job")
    job.add_argument("--config", help="JSON file of SFTConfig settings")
    job.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    job.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint in --output (default: yes)",
    )
    add_config_flags(
        p.add_argument_group("job options (JobOptions)"),
        JobOptions,
        skip=tuple(NOT_SFT_OPTIONS),
        aliases={"eval_dataset": "--eval-data"},
    )
    add_config_flags(p.add_argument_group("training (SFTConfig)"), SFTConfig)
    p.set_defaults(func=run)


def build_sft_config(args: argparse.Namespace) -> SFTConfig:
    """Defaults < --config file < flags."""
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    names = {f.name for f in config_fields(SFTConfig)}
    return SFTConfig.from_dict({**data, **{k: v for k, v in vars(args).items() if k in names}})


def run(args: argparse.Namespace) -> int:
    try:
        spec = JobSpec(
            kind="sft",
            teacher=None,
            student=args.student,
            dataset=args.data,
            train=build_sft_config(args),
            output_dir=args.output,
            store_root="",
            device=_device(args.device),
            options=build_options(args),
        )
        check_world(spec.train)
    except (ConfigError, OSError, json.JSONDecodeError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return execute(spec, resume=args.resume)
