"""How a setting is declared, read back and checked: the one declaration of every config field.

Every field is declared once, with `_help(text, default=..., ge=/gt=/le=/lt=..., choices=...)`:
the help string, the bounds and the choices live in the field's metadata (a `Literal` type gives
the choices too). `config_fields(cls)` reads them back; the same declaration feeds the dataclass
check (`check_fields`, run by every `__post_init__`), the API schema (service/hyperparams.py), the
CLI flags (tvkd/cli/train.py), the README table (scripts/config_reference.py) and, through the
OpenAPI document, the dashboard's form. `_like` re-declares a field of one config for another.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

BOUND_KEYS = ("ge", "gt", "le", "lt")


class ConfigError(ValueError):
    """A setting is out of range or inconsistent with another. `field` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _help(
    text: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    **kw: Any,
) -> Any:
    """A config field: its help string, and the bounds (`ge`/`gt`/`le`/`lt`) or `choices` that
    `check_fields` enforces and the API schema, CLI and README show."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta: dict[str, Any] = {"help": text, "bounds": bounds}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(metadata=meta, **kw)


@dataclass(frozen=True)
class ConfigField:
    """One declared setting, as `config_fields` reads it back from a config dataclass."""

    name: str
    type: Any  # int, float, bool, str, list[str], a Literal[...] or a nested config dataclass
    default: Any  # the default value (a factory's value for list/dataclass fields)
    help: str
    bounds: dict[str, float]  # any of ge, gt, le, lt
    choices: tuple[str, ...] | None  # from `choices=` or the Literal type
    optional: bool = False  # `X | None`: None is allowed too (`type` is then X)

    def check(self, value: Any) -> None:
        """Raise ConfigError naming this field when `value` has the wrong type or is out of range."""
        if value is None and self.optional:
            return
        if self.choices is not None and self.type == list[str]:  # a list of names, each a choice
            if not _is_a(value, list[str]):
                raise ConfigError(self.name, f"must be a list of names; got {value!r}")
            for item in value:
                _check_choice(self.name, item, self.choices)
        elif self.choices is not None:
            _check_choice(self.name, value, self.choices)
        elif self.type is int:
            _check_int(self.name, value, **self.bounds)
        elif self.type is float:
            _check_range(self.name, value, **self.bounds)
        elif not _is_a(value, self.type):
            what = getattr(self.type, "__name__", str(self.type))
            raise ConfigError(self.name, f"must be a {what}; got {value!r}")

    def range_text(self) -> str:
        """The allowed values in words: `> 0`, `[0, 1)`, `model | zero`, or '' when unrestricted."""
        if self.choices is not None:
            return " | ".join(self.choices)
        b = {k: f"{v:g}" for k, v in self.bounds.items()}
        low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
        high = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
        if low and high:
            return f"{low[0]}{low[1]}, {high[0]}{high[1]}"
        if low:
            return f"{'≥' if low[0] == '[' else '>'} {low[1]}"
        if high:
            return f"{'≤' if high[1] == ']' else '<'} {high[0]}"
        return ""


def _is_a(value: Any, kind: Any) -> bool:
    if kind == list[str]:  # a tuple of names is taken too
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind) if isinstance(kind, type) else True


@functools.cache
def config_fields(cls: type) -> tuple[ConfigField, ...]:
    """The declared fields of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args and typing.get_origin(hint) in (typing.Union, types.UnionType)
        if optional:
            (hint,) = [a for a in args if a is not type(None)]
        choices = f.metadata.get("choices")
        if choices is None and typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(
            ConfigField(
                name=f.name,
                type=hint,
                default=default,
                help=f.metadata.get("help", ""),
                bounds=dict(f.metadata.get("bounds", {})),
                choices=tuple(choices) if choices is not None else None,
                optional=optional,
            )
        )
    return tuple(out)


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass against its declaration (type, bounds, choices),
    in declaration order; the first problem raises ConfigError naming the field."""
    for f in config_fields(type(config)):
        f.check(getattr(config, f.name))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")


def _check_range(
    name: str,
    value: float,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number; got {value!r}")
    if value != value:  # NaN
        raise ConfigError(name, "must not be NaN")
    if ge is not None and value < ge:
        raise ConfigError(name, f"must be >= {ge}; got {value}")
    if gt is not None and value <= gt:
        raise ConfigError(name, f"must be > {gt}; got {value}")
    if le is not None and value > le:
        raise ConfigError(name, f"must be <= {le}; got {value}")
    if lt is not None and value >= lt:
        raise ConfigError(name, f"must be < {lt}; got {value}")


def _check_int(name: str, value: int, **bounds: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer; got {value!r}")
    _check_range(name, value, **bounds)


def _like(cls: type, name: str, **change: Any) -> Any:
    """The declaration of `cls.name` (help, bounds, choices, default) for another config class,
    with `default=` or `help=` changed: a setting shared by two jobs is declared once."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = dict(f.metadata)
    if "help" in change:
        meta["help"] = change.pop("help")
    if "default" not in change:
        if f.default is not dataclasses.MISSING:
            change["default"] = f.default
        else:
            change["default_factory"] = f.default_factory
    return field(metadata=meta, **change)


def _refuse_unknown(data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], "unknown setting")


def _build(cls: Any, data: Mapping[str, Any]) -> Any:
    _refuse_unknown(data, {f.name for f in dataclasses.fields(cls)})
    return cls(**data)


def field_help(cls: type) -> dict[str, str]:
    """Field name → help string, for CLIs, the API schema and the dashboard."""
    return {f.name: f.help for f in config_fields(cls)}
