"""The `hyperparameters` object of a job, generated from tvkd's config dataclasses.

Every field of `TrainConfig` and `MethodConfig` (except `alpha`/`beta`, which are top-level in the
request, and `method`, which is flattened) becomes a pydantic field with the dataclass's type,
default and help string (the OpenAPI description). Ranges come from the dataclasses' own
`__post_init__` checks (`_check_range("lr", ..., gt=0.0)`), read with `ast`, so the documented
constraints cannot drift from the checks that tvkd runs; the request is still validated by the
dataclasses too (service.validation), which stay the source of truth.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from tvkd.config import MethodConfig, TrainConfig

# Sanity cap of integer settings (none needs more): the largest integer a float64 (and so a JSON
# number in most clients, and the OpenAPI bound itself) holds exactly; inside int64 everywhere.
INT_MAX = 2**53 - 1
TOP_LEVEL = frozenset({"alpha", "beta"})
BOUND_KEYS = ("ge", "gt", "le", "lt")
SafeStr = typing.Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]


def dataclass_ranges(cls: type) -> dict[str, dict[str, float]]:
    """Field → {ge/gt/le/lt: bound} from the `_check_range`/`_check_int` calls of `cls.__post_init__`."""
    source = textwrap.dedent(inspect.getsource(cls.__post_init__))  # type: ignore[attr-defined]
    out: dict[str, dict[str, float]] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in ("_check_range", "_check_int") or not node.args:
            continue
        name = node.args[0]
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
            continue
        bounds = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg in BOUND_KEYS}
        out.setdefault(name.value, {}).update(bounds)
    return out


def _field(f: dataclasses.Field[Any], hint: Any, bounds: dict[str, float]) -> tuple[Any, Any]:
    help_text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        default: dict[str, Any] = {"default": f.default}
    else:
        # A factory default would be missing from the OpenAPI document: show its value there.
        default = {
            "default_factory": f.default_factory,
            "json_schema_extra": {"default": f.default_factory()},
        }
    kw: dict[str, Any] = {**default, "description": help_text, **bounds}
    if hint is float:
        kw["allow_inf_nan"] = False
    elif hint is int:
        kw.setdefault("le", INT_MAX)
    elif hint == list[str]:
        hint = list[SafeStr]
        kw["max_length"] = 64
    return hint, Field(**kw)


# Options of the job itself rather than of TrainConfig (worker.jobspec.SPEC_OPTIONS reads them).
JOB_OPTIONS: dict[str, tuple[Any, Any]] = {
    "eval_dataset": (
        typing.Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00]*$")] | None,
        Field(
            default=None,
            description="Held-out pairs (same rules as `dataset`); default: `eval_fraction` of the dataset.",
        ),
    ),
    "limit": (
        int | None,
        Field(default=None, ge=1, le=INT_MAX, description="Read only the first N rows of each dataset."),
    ),
    "on_error": (
        typing.Literal["drop", "raise"],
        Field(default="drop", description="Bad rows: 'drop' them (reported in events) or 'raise' (fail)."),
    ),
    "precompute_bf16": (
        bool,
        Field(default=False, description="Run the teacher pass under bf16 autocast (values stay float32)."),
    ),
}


def _hyperparameter_fields() -> dict[str, tuple[Any, Any]]:
    fields: dict[str, tuple[Any, Any]] = {}
    for cls in (MethodConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        ranges = dataclass_ranges(cls)
        for f in dataclasses.fields(cls):
            if f.name in TOP_LEVEL or f.name == "method":
                continue
            fields[f.name] = _field(f, hints[f.name], ranges.get(f.name, {}))
    return {**fields, **JOB_OPTIONS}


class _Strict(BaseModel):
    # Strict: "5" is not an integer, 1 is not a boolean, 1.5 is not an integer (an int is still
    # accepted where a float is expected); unknown settings are an error naming the key.
    model_config = ConfigDict(strict=True, extra="forbid")


Hyperparameters: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "Hyperparameters",
    __base__=_Strict,
    __doc__="TVKD and training settings (tvkd.config.MethodConfig and TrainConfig); omitted ones "
    "take their defaults. Unknown keys are rejected.",
    **_hyperparameter_fields(),
)


def top_level_field(name: str) -> Any:
    """`alpha`/`beta` of the request, with MethodConfig's default, help and range."""
    f = next(f for f in dataclasses.fields(MethodConfig) if f.name == name)
    bounds = dataclass_ranges(MethodConfig).get(name, {})
    return Field(default=f.default, description=f.metadata.get("help", ""), allow_inf_nan=False, **bounds)
