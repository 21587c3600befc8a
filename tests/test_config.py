"""A config field is declared once (`_help(text, default=..., ge=..., choices=...)`) and that one
declaration drives the dataclass check, the API schema, the CLI flags and the README table."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from tvkd.config import (
    ConfigError,
    ConfigField,
    JobOptions,
    MethodConfig,
    PrecomputeConfig,
    SFTConfig,
    TrainConfig,
    _help,
    check_fields,
    config_fields,
)

CONFIGS = (MethodConfig, TrainConfig, JobOptions, PrecomputeConfig, SFTConfig)
BOUNDED = [
    pytest.param(cls, f, id=f"{cls.__name__}.{f.name}")
    for cls in CONFIGS
    for f in config_fields(cls)
    if f.bounds
]
CHOICES = [
    pytest.param(cls, f, id=f"{cls.__name__}.{f.name}")
    for cls in CONFIGS
    for f in config_fields(cls)
    if f.choices
]


def _outside(f: ConfigField) -> list[Any]:
    step = 1 if f.type is int else 0.25
    out = []
    for kind, bound in f.bounds.items():
        value = {"ge": bound - step, "gt": bound, "le": bound + step, "lt": bound}[kind]
        out.append(int(value) if f.type is int else float(value))
    return out


def _inside(f: ConfigField) -> list[Any]:
    """The closed ends of the range (legal values)."""
    return [f.type(v) for k, v in f.bounds.items() if k in ("ge", "le")]


def test_every_numeric_field_declares_its_range() -> None:
    numeric = {(cls, f.name) for cls in CONFIGS for f in config_fields(cls) if f.type in (int, float)}
    bounded = {(p.values[0], p.values[1].name) for p in BOUNDED}
    assert numeric == bounded


@pytest.mark.parametrize(("cls", "f"), BOUNDED)
def test_the_dataclass_checks_the_declared_bounds(cls: type, f: ConfigField) -> None:
    for value in _outside(f):
        with pytest.raises(ConfigError) as info:
            cls(**{f.name: value})
        assert info.value.field == f.name, value
    for value in _inside(f):
        assert getattr(cls(**{f.name: value}), f.name) == value
    with pytest.raises(ConfigError, match="NaN" if f.type is float else "integer"):
        cls(**{f.name: float("nan")})


@pytest.mark.parametrize(("cls", "f"), CHOICES)
def test_the_dataclass_checks_the_declared_choices(cls: type, f: ConfigField) -> None:
    many = f.type == list[str]  # a list of names, each one of the choices
    for choice in f.choices or ():
        value = [choice] if many else choice
        assert getattr(cls(**{f.name: value}), f.name) == value
    with pytest.raises(ConfigError) as info:
        cls(**{f.name: ["no-such-choice"] if many else "no-such-choice"})
    assert info.value.field == f.name and "must be one of" in info.value.message


def test_types_are_checked_too() -> None:
    for name, value in (("lora", "yes"), ("lora_target_modules", "q_proj"), ("batch_size", 2.0)):
        with pytest.raises(ConfigError) as info:
            TrainConfig(**{name: value})
        assert info.value.field == name
    with pytest.raises(ConfigError) as info:
        TrainConfig(method={"alpha": -1.0})  # the nested method is checked as it is built
    assert info.value.field == "alpha"


def test_a_declaration_without_source_code_still_works() -> None:
    """No source parsing: a dataclass made at run time (no source file) declares bounds too."""

    def post_init(self: Any) -> None:
        check_fields(self)

    cls = dataclasses.make_dataclass(
        "Made",
        [
            ("width", int, _help("A width.", default=4, ge=3, le=9)),
            ("mode", str, _help("A mode.", default="a", choices=("a", "b"))),
        ],
        namespace={"__post_init__": post_init},
    )
    width, mode = config_fields(cls)
    assert (width.bounds, width.range_text(), width.help) == ({"ge": 3, "le": 9}, "[3, 9]", "A width.")
    assert (mode.choices, mode.range_text()) == (("a", "b"), "a | b")
    for bad in ({"width": 2}, {"width": 10}, {"mode": "c"}):
        with pytest.raises(ConfigError) as info:
            cls(**bad)
        assert info.value.field == next(iter(bad))
    assert cls(width=9, mode="b").width == 9


def _schema_bounds(prop: dict[str, Any]) -> dict[str, float]:
    names = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le", "exclusiveMaximum": "lt"}
    return {names[k]: v for k, v in prop.items() if k in names}


def test_the_api_schema_has_the_declared_bounds_defaults_and_help() -> None:
    from service.hyperparams import INT_MAX, Hyperparameters
    from service.schemas import JobCreate

    hyper = Hyperparameters.model_json_schema()["properties"]
    top = JobCreate.model_json_schema()["properties"]
    seen = set()
    for cls in (MethodConfig, TrainConfig, JobOptions):
        for f in config_fields(cls):
            if f.name == "method":
                continue
            prop = top[f.name] if f.name in ("alpha", "beta") else hyper[f.name]
            if f.optional:  # anyOf [the type, null]
                prop = {**prop, **next(p for p in prop["anyOf"] if p.get("type") != "null")}
            seen.add(f.name)
            expected = dict(f.bounds)
            if f.type is int:
                expected.setdefault("le", INT_MAX)
            assert _schema_bounds(prop) == expected, f.name
            assert prop["description"] == f.help
            assert prop["default"] == f.default
            if f.choices:
                enum = prop["items"]["enum"] if f.type == list[str] else prop["enum"]
                assert tuple(enum) == f.choices, f.name
    assert {"alpha", "beta", "gamma", "learning_rate", "lora_target_modules"} <= seen


def test_cli_flags_have_the_declared_types_choices_and_ranges() -> None:
    from tvkd.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for cls in (MethodConfig, TrainConfig, JobOptions):
        for f in config_fields(cls):
            if f.name == "method":
                continue
            action = actions[f.name]
            assert f.help.replace("%", "%%") in (action.help or ""), f.name
            if f.bounds:
                assert f.range_text() in (action.help or ""), f.name
            if f.choices:
                assert tuple(action.choices or ()) == f.choices
            elif f.type is bool:
                assert isinstance(action, argparse.BooleanOptionalAction)
            elif f.type in (int, float):
                assert action.type is f.type


def test_cli_values_are_checked_by_the_dataclass() -> None:
    from tvkd.cli.train import build_config

    args = argparse.Namespace(config=None, gamma=1.5, batch_size=4)
    with pytest.raises(ConfigError) as info:
        build_config(args)
    assert info.value.field == "gamma"
    assert build_config(argparse.Namespace(config=None, gamma=0.5)).method.gamma == 0.5


def test_readme_table_shows_the_declared_ranges() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    for cls in CONFIGS:
        for f in config_fields(cls):
            if f.name == "method":
                continue
            allowed = f.range_text().replace("|", "\\|")
            assert f"| `{f.name}` | `{f.default!r}` | {allowed} |" in text, f.name


def test_a_dpo_job_whose_method_uses_the_teacher_is_refused_by_the_one_kind_check() -> None:
    """The kind rule (a 'dpo' job's method uses no teacher) is one function, `check_kind`, that the
    spec and the API's submit check both run: the same field and message from each."""
    from service.errors import APIError
    from service.validation import check_settings
    from tvkd.config import JobSpec, check_kind

    train = TrainConfig(method=MethodConfig(alpha=0.5))
    message = "a 'dpo' job trains plain DPO: alpha must be 0; got 0.5"
    with pytest.raises(ConfigError) as lib:
        check_kind("dpo", train)
    assert (lib.value.field, lib.value.message) == ("alpha", message)
    with pytest.raises(ConfigError) as spec:
        JobSpec(teacher="t", student="s", dataset="d", train=train, output_dir="o", store_root="", kind="dpo")
    assert (spec.value.field, spec.value.message) == ("alpha", message)
    with pytest.raises(APIError) as api:
        check_settings(0.5, 0.1, {}, kind="dpo", given=frozenset({"alpha"}))
    assert (api.value.status, api.value.field, api.value.message) == (422, "alpha", message)
    check_kind("dpo", TrainConfig(method=MethodConfig(alpha=0.5, shaping="none")))  # no teacher: fine
    assert check_settings(0.0, 0.1, {}, kind="dpo").settings["kind"] == "dpo"
