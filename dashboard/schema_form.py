"""Forms generated from the API's OpenAPI document: one widget per field of a request schema,
with the schema's default, description and range, so that a new setting or a changed default in
the API shows up here without a dashboard change.

The API stays the judge of what is valid: number widgets carry no client-side bounds (the range
is in the help text), and the 422 the API answers is shown beside the field its `field` path
names (`hyperparameters.learning_rate` → that widget).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from dashboard.api_client import ApiError

BOUND_WORDS = (("exclusiveMinimum", ">"), ("minimum", "≥"), ("exclusiveMaximum", "<"), ("maximum", "≤"))
# Bounds that only say "fits in a JSON number" are noise in a help text.
HUGE = 2**52


@dataclass
class FieldSpec:
    """One request field as the form shows it."""

    path: str  # dotted path in the request body, also the error `field` the API uses
    title: str
    kind: str  # enum | bool | int | float | str | list | dict
    description: str = ""
    has_default: bool = False
    default: Any = None
    nullable: bool = False
    required: bool = False
    options: list[Any] = field(default_factory=list)
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def help(self) -> str:
        parts = [self.description.strip()] if self.description else []
        rng = ", ".join(f"{word} {_num(self.bounds[k])}" for k, word in BOUND_WORDS if k in self.bounds)
        if rng:
            parts.append(f"Range: {rng}.")
        if self.has_default:
            parts.append(f"Default: `{_show(self.default)}`.")
        elif not self.required:
            parts.append("Leave empty for the API's default.")
        return "  \n".join(parts)


def resolve(doc: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """`node` with a `$ref` into components/schemas followed (its own keys win)."""
    ref = node.get("$ref")
    if not ref:
        return dict(node)
    name = str(ref).rsplit("/", 1)[-1]
    target = doc.get("components", {}).get("schemas", {}).get(name, {})
    return {**resolve(doc, target), **{k: v for k, v in node.items() if k != "$ref"}}


def request_schema(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    schema = doc.get("components", {}).get("schemas", {}).get(name)
    if not isinstance(schema, dict):
        raise KeyError(f"the API's OpenAPI document has no schema {name!r}")
    return schema


def field_specs(doc: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = "") -> list[FieldSpec]:
    """The fields of an object schema in the schema's order; nested objects with properties of
    their own (the job's `hyperparameters`) are flattened into dotted paths."""
    required = set(schema.get("required", []))
    out: list[FieldSpec] = []
    for name, raw in schema.get("properties", {}).items():
        node = resolve(doc, raw)
        path = f"{prefix}{name}"
        if node.get("type") == "object" and node.get("properties"):
            out.extend(field_specs(doc, node, prefix=f"{path}."))
            continue
        out.append(_spec(path, node, required=name in required))
    return out


def _spec(path: str, node: dict[str, Any], *, required: bool) -> FieldSpec:
    variants = node.get("anyOf") or node.get("oneOf") or [node]
    nullable = any(v.get("type") == "null" for v in variants)
    main = next((v for v in variants if v.get("type") != "null"), {})
    bounds = {k: float(main[k]) for k, _ in BOUND_WORDS if k in main and abs(float(main[k])) < HUGE}
    kind = {"boolean": "bool", "integer": "int", "number": "float", "array": "list", "object": "dict"}.get(
        str(main.get("type")), "str"
    )
    if "enum" in main:
        kind = "enum"
    if len([v for v in variants if v.get("type") != "null"]) > 1:
        kind = "str"  # text or messages (the inspect prompt): the caller builds its own widget
    return FieldSpec(
        path=path,
        title=str(node.get("title") or path),
        kind=kind,
        description=str(node.get("description") or main.get("description") or ""),
        has_default="default" in node,
        default=node.get("default"),
        nullable=nullable,
        required=required,
        options=list(main.get("enum", [])),
        bounds=bounds,
    )


# --------------------------------------------------------------------------------------------
# widgets


def widget_key(form: str, spec: FieldSpec) -> str:
    return f"{form}:{spec.path}"


def render_field(form: str, spec: FieldSpec, errors: Mapping[str, list[str]]) -> Any:
    """Draw the widget of one field (and its errors below it); return its raw value."""
    key, label, help_text = widget_key(form, spec), spec.name, spec.help()
    if spec.kind == "enum" and not spec.nullable:
        index = spec.options.index(spec.default) if spec.default in spec.options else 0
        value: Any = st.selectbox(label, spec.options, index=index, key=key, help=help_text)
    elif spec.kind == "bool":
        value = st.checkbox(label, value=bool(spec.default), key=key, help=help_text)
    elif spec.kind == "int" and spec.has_default and not spec.nullable:
        value = st.number_input(label, value=int(spec.default), step=1, key=key, help=help_text)
    elif spec.kind == "float" and spec.has_default and not spec.nullable:
        default = float(spec.default)
        value = st.number_input(
            label, value=default, step=_step(default), format="%g", key=key, help=help_text
        )
    elif spec.kind == "dict":
        value = st.text_area(label, value="", key=key, help=help_text, placeholder="key=value, one a line")
    else:
        start = _show(spec.default) if spec.has_default and spec.default is not None else ""
        placeholder = "(API default)" if not spec.required else ""
        value = st.text_input(label, value=start, key=key, help=help_text, placeholder=placeholder)
    for message in errors.get(spec.path, []):
        st.error(message, icon=":material/error:")
    return value


def collect(
    specs: Iterable[FieldSpec], values: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The request body from the widgets' values, and the values that could not be read (field →
    messages). A field is sent when it is required or differs from the API's default, so the body
    says what the user chose and the API fills in the rest."""
    body: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for spec in specs:
        raw = values.get(spec.path)
        try:
            value, present = _parse(spec, raw)
        except ValueError as exc:
            errors.setdefault(spec.path, []).append(str(exc))
            continue
        if not present:
            continue
        if spec.has_default and not spec.required and _same(value, spec.default):
            continue
        node = body
        *parents, last = spec.path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return body, errors


def _parse(spec: FieldSpec, raw: Any) -> tuple[Any, bool]:
    """(value, present). Text that does not parse as the field's type is sent as typed, so the
    API's 422 says what is wrong with it, beside the field."""
    if spec.kind in ("enum", "bool") or not isinstance(raw, str):
        return raw, raw is not None
    text = raw.strip()
    if spec.kind == "dict":
        pairs: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if "=" not in line:
                raise ValueError(f"line {n}: write key=value")
            k, v = line.split("=", 1)
            pairs[k.strip()] = v.strip()
        return pairs, bool(pairs)
    if not text:
        if spec.required:
            return "", True
        return None, False
    if spec.kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()], True
    if spec.kind == "int":
        try:
            return int(text), True
        except ValueError:
            return text, True
    if spec.kind == "float":
        try:
            return float(text), True
        except ValueError:
            return text, True
    return raw if spec.required else text, True


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, float) and isinstance(default, int | float) and not isinstance(default, bool):
        return math.isclose(value, float(default), rel_tol=1e-12, abs_tol=0.0)
    return bool(value == default)


def _step(default: float) -> float:
    if default == 0 or not math.isfinite(default):
        return 0.01
    return float(10 ** math.floor(math.log10(abs(default))))


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --------------------------------------------------------------------------------------------
# errors


def field_errors(exc: ApiError, paths: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """The API's 422 split by the form's fields: ({path: messages}, messages of no field).

    Each entry of `details` names its field; an error below a widget (`metadata.k`,
    `lora_target_modules[2]`) goes to that widget; one naming no field of the form (a header such
    as Idempotency-Key, or none) is shown above the form.
    """
    known = sorted(paths, key=len, reverse=True)
    items = [(d.get("field"), str(d.get("message") or d)) for d in exc.details if isinstance(d, dict)]
    if exc.field and not any(f == exc.field for f, _ in items):
        items.insert(0, (exc.field, exc.message))
    if not items:
        items = [(exc.field, exc.message)]
    placed: dict[str, list[str]] = {}
    loose: list[str] = []
    for fld, message in items:
        target = next((p for p in known if fld and (fld == p or fld.startswith((p + ".", p + "[")))), None)
        if target is None:
            loose.append(f"{fld}: {message}" if fld else message)
            continue
        text = message if fld == target else f"{fld}: {message}"
        if text not in placed.setdefault(target, []):
            placed[target].append(text)
    return placed, loose
