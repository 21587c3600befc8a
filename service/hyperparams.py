"""The `hyperparameters` object of a job, generated from tvkd's config dataclasses.

Every field of `MethodConfig`, `TrainConfig` and `JobOptions` (except `alpha`/`beta`, which are
top-level in the request, and `method`, which is flattened) becomes a pydantic field with the
dataclass's type, default, help string (the OpenAPI description) and bounds, all read from the
field's declaration (`tvkd.config.config_fields`), the same one the dataclass checks itself
against; so the documented constraints cannot drift from the checks that tvkd runs. The request
is still validated by the dataclasses too (service.validation), which stay the source of truth.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from tvkd.config import ConfigField, JobOptions, MethodConfig, TrainConfig, config_fields

# Sanity cap of integer settings (none needs more): the largest integer a float64 (and so a JSON
# number in most clients, and the OpenAPI bound itself) holds exactly; inside int64 everywhere.
INT_MAX = 2**53 - 1
TOP_LEVEL = frozenset({"alpha", "beta"})
SafeStr = typing.Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]
# A name (of a dataset, a model) that reaches the file system: no NUL, not empty.
Name = typing.Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00]*$")]


def _field(f: ConfigField) -> tuple[Any, Any]:
    hint: Any = f.type
    if isinstance(f.default, list):
        # A factory default: a fresh list per request, and its value shown in the OpenAPI document.
        default: dict[str, Any] = {
            "default_factory": lambda: list(f.default),
            "json_schema_extra": {"default": f.default},
        }
    else:
        default = {"default": f.default}
    kw: dict[str, Any] = {**default, "description": f.help, **f.bounds}
    if f.choices is not None and hint == list[str]:  # a list of names, each one of the choices
        hint = list[typing.Literal[f.choices]]  # type: ignore[valid-type]
        kw["max_length"] = len(f.choices)
    elif f.choices is not None and typing.get_origin(hint) is not typing.Literal:
        hint = typing.Literal[f.choices]
    if hint is str:
        hint = Name
    if hint is float:
        kw["allow_inf_nan"] = False
    elif hint is int:
        kw.setdefault("le", INT_MAX)
    elif hint == list[str]:
        hint = list[SafeStr]
        kw["max_length"] = 64
    return (hint | None if f.optional else hint), Field(**kw)


def _hyperparameter_fields() -> dict[str, tuple[Any, Any]]:
    fields: dict[str, tuple[Any, Any]] = {}
    for cls in (MethodConfig, TrainConfig, JobOptions):
        for f in config_fields(cls):
            if f.name in TOP_LEVEL or f.name == "method":
                continue
            fields[f.name] = _field(f)
    return fields


class _Strict(BaseModel):
    # Strict: "5" is not an integer, 1 is not a boolean, 1.5 is not an integer (an int is still
    # accepted where a float is expected); unknown settings are an error naming the key.
    model_config = ConfigDict(strict=True, extra="forbid")


Hyperparameters: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "Hyperparameters",
    __base__=_Strict,
    __doc__="TVKD and training settings and job options (tvkd.config.MethodConfig, TrainConfig and "
    "JobOptions); omitted ones take their defaults. Unknown keys are rejected.",
    **_hyperparameter_fields(),
)


def top_level_field(name: str) -> Any:
    """`alpha`/`beta` of the request, with MethodConfig's default, help and range."""
    f = next(f for f in config_fields(MethodConfig) if f.name == name)
    return Field(default=f.default, description=f.help, allow_inf_nan=False, **f.bounds)
