"""Print the README's configuration reference (every field of the config dataclasses, with its
default and help), or with --check, fail when the README's copy is out of date.

    python scripts/config_reference.py            # print the markdown
    python scripts/config_reference.py --write    # rewrite the README section in place
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tvkd.config import (
    ConfigField,
    JobOptions,
    MethodConfig,
    PrecomputeConfig,
    SFTConfig,
    TrainConfig,
    config_fields,
)

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- CONFIG-REFERENCE:BEGIN -->", "<!-- CONFIG-REFERENCE:END -->"


def _default(f: ConfigField) -> str:
    return "(see below)" if dataclasses.is_dataclass(f.default) else repr(f.default)


def table(cls: type, skip: tuple[str, ...] = ()) -> str:
    """Every declared field of a config dataclass: default, allowed values and help, all read from
    the field's declaration (`config_fields`), the one the dataclass checks itself against."""
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for f in config_fields(cls):
        if f.name in skip:
            continue
        text = f.help.replace("|", "\\|")
        allowed = f.range_text().replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{_default(f)}` | {allowed} | {text} |")
    return "\n".join(rows)


def settings_table() -> str:
    from service.settings import Settings

    rows = ["| environment variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "(empty)" if default in ("", [], None) else str(default)
        rows.append(f"| `TVKD_{name.upper()}` | `{shown}` | {info.description or ''} |")
    return "\n".join(rows)


def render() -> str:
    return "\n\n".join(
        [
            BEGIN,
            "**Method** (`MethodConfig`; job `alpha`, `beta` and `hyperparameters`; `tvkd train --FIELD`)",
            table(MethodConfig),
            "**Training** (`TrainConfig`; job `hyperparameters`; `tvkd train --FIELD`)",
            table(TrainConfig, skip=("method",)),
            "**Job options** (`JobOptions`; job `hyperparameters`; `tvkd train --FIELD`)",
            table(JobOptions),
            "**Supervised fine-tuning** (`SFTConfig`; `tvkd sft --FIELD`)",
            table(SFTConfig),
            "**Precompute** (`PrecomputeConfig`; `tvkd precompute`; derived from the method in a job)",
            table(PrecomputeConfig),
            "**Service settings** (environment or `.env`; `service/settings.py`)",
            settings_table(),
            END,
        ]
    )


def main(argv: list[str]) -> int:
    text = README.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        print(f"README.md lacks the {BEGIN} … {END} markers", file=sys.stderr)
        return 1
    current = text[start : end + len(END)]
    if "--write" in argv:
        README.write_text(text.replace(current, render()))
        return 0
    if "--check" in argv:
        if current != render():
            print("README configuration reference is stale: python scripts/config_reference.py --write")
            return 1
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
