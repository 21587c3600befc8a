"""The `tvkd` command line. Each sub-command lives in its own module here and exposes
`register(subparsers)`; this file only wires them together, importing each lazily enough that
`tvkd --help` stays fast and server-side commands do not import torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Module names under tvkd.cli; each defines register(subparsers) -> None.
COMMAND_MODULES = (
    "demo",
    "up",
    "serve",
    "keys",
    "worker",
    "dashboard",
    "client",
    "download",
    "models",
    "data",
    "precompute",
    "sft",
    "train",
    "inspect",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvkd", description="Teacher Value-based Knowledge Distillation (TVKD)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tvkd.cli.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet
            if exc.name == f"tvkd.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # Hugging Face's per-load tqdm bars ('Loading weights', 'Writing model shards') are
        # redrawn bars; into a log or a pipe they are noise (tvkd prints its own progress lines).
        # Read when huggingface_hub is imported, so set before any command imports it.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tvkd ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except Exception as exc:
        lines = _settings_errors(exc)
        if not lines:
            raise
        for line in lines:
            print(line, file=sys.stderr)
        return 2


def _settings_errors(exc: BaseException) -> list[str]:
    """One line per bad field of the service's Settings (pydantic's ValidationError, titled
    "Settings"), naming its environment variable (TVKD_ + the field), the value and the rule;
    [] for any other error. Matched by name: tvkd/ imports no service code."""
    if type(exc).__name__ != "ValidationError" or getattr(exc, "title", None) != "Settings":
        return []
    lines = []
    for err in exc.errors():  # type: ignore[attr-defined]
        field = ".".join(str(part) for part in err.get("loc", ()))
        lines.append(f"error: setting TVKD_{field.upper()}={err.get('input')!r}: {err.get('msg')}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
