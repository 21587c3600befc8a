"""The dashboard's pure helpers, without Streamlit or an API: token colouring and escaping,
request bodies from form values, 422 placement, stage spans from events."""

from __future__ import annotations

import html

import pytest

from dashboard.api_client import ApiError
from dashboard.charts import stage_spans
from dashboard.schema_form import FieldSpec, collect, field_errors
from dashboard.tokens import colour, scale_of, signal_values, tokens_html, top_psi


def tok(i: int, text: str, psi: float | None, value: float = 5.0, logratio: float | None = None) -> dict:
    return {"index": i, "id": 100 + i, "text": text, "psi": psi, "value": value, "teacher_logp": -1.0,
            "logratio": logratio}  # fmt: skip


def test_tokens_are_escaped_and_top_three_marked() -> None:
    tokens = [tok(0, '<img src=x onerror="a()">', 0.5), tok(1, "&", -0.2), tok(2, "\n", 0.9), tok(3, "", 0.1)]
    values = signal_values(tokens, "psi", None)
    out = tokens_html(tokens, values, scale_of(values), top_psi(tokens), side='x"><b>')
    assert "<img" not in out and "<b>" not in out
    assert "&lt;img src=x onerror=&quot;a()&quot;&gt;" in out
    assert ">&amp;</span>" in out and ">↵\n</span>" in out and ">∅</span>" in out
    assert top_psi(tokens) == {2: 1, 0: 2, 3: 3}
    assert out.count('class="tvkd-tok tvkd-top"') == 3
    title = html.unescape(out.split('title="', 1)[1].split('"', 1)[0])
    assert "id: 100" in title and "ψ_t: 0.5" in title and "β·log-ratio: n/a" in title and "top-2 ψ" in title


def test_colours_diverge_around_zero() -> None:
    assert colour(0.0, 1.0)[0] == "rgb(247, 247, 247)"
    low, high = colour(-1.0, 1.0)[0], colour(1.0, 1.0)[0]
    assert low.startswith("rgb(103") and high.startswith("rgb(5,")
    assert colour(None, 1.0)[0] != colour(0.0, 1.0)[0]
    assert colour(3.0, 0.0)[0] == colour(0.0, 1.0)[0]  # no scale: everything neutral


def test_value_signal_is_centred() -> None:
    tokens = [tok(0, "a", 0.1, value=6.25), tok(1, "b", 0.1, value=6.35)]
    assert signal_values(tokens, "value", 6.25) == [0.0, pytest.approx(0.1)]
    assert signal_values(tokens, "logratio", None) == [None, None]
    assert scale_of([None, -0.3], [0.2]) == 0.3


def spec(
    path: str, kind: str, default: object = None, *, has_default: bool = True, **kw: object
) -> FieldSpec:
    return FieldSpec(path=path, title=path, kind=kind, default=default, has_default=has_default, **kw)  # type: ignore[arg-type]


def test_collect_sends_what_differs_from_the_defaults() -> None:
    specs = [
        spec("teacher", "str", has_default=False, required=True),
        spec("alpha", "float", 0.7),
        spec("hyperparameters.max_steps", "int", 0),
        spec("hyperparameters.learning_rate", "float", 5e-6),
        spec("hyperparameters.limit", "int", None, nullable=True),
        spec("hyperparameters.lora_target_modules", "list", has_default=False),
        spec("metadata", "dict", has_default=False),
    ]
    values = {
        "teacher": "t",
        "alpha": 0.7,
        "hyperparameters.max_steps": 4,
        "hyperparameters.learning_rate": 5e-6,
        "hyperparameters.limit": "abc",  # sent as typed: the API's 422 names it
        "hyperparameters.lora_target_modules": "q_proj, v_proj ,",
        "metadata": "a=1\n\nb = two",
    }
    body, errors = collect(specs, values)
    assert errors == {}
    assert body == {
        "teacher": "t",
        "hyperparameters": {"max_steps": 4, "limit": "abc", "lora_target_modules": ["q_proj", "v_proj"]},
        "metadata": {"a": "1", "b": "two"},
    }
    _, errors = collect(specs, {**values, "metadata": "no equals sign"})
    assert errors == {"metadata": ["line 1: write key=value"]}


def test_422_goes_to_the_named_field() -> None:
    exc = ApiError(
        422,
        "invalid_value",
        "hyperparameters.learning_rate: too small",
        field="hyperparameters.learning_rate",
        details=[
            {"field": "hyperparameters.learning_rate", "message": "too small"},
            {"field": "metadata.k", "message": "too long"},
            {"field": "Idempotency-Key", "message": "reused"},
        ],
    )
    placed, loose = field_errors(exc, ["teacher", "metadata", "hyperparameters.learning_rate"])
    assert placed == {"hyperparameters.learning_rate": ["too small"], "metadata": ["metadata.k: too long"]}
    assert loose == ["Idempotency-Key: reused"]


def test_stage_spans() -> None:
    events = [
        {"created_at": "2026-01-01T00:00:00Z", "stage": "validate", "level": "info"},
        {"created_at": "2026-01-01T00:00:01Z", "stage": "validate", "level": "warning"},
        {"created_at": "2026-01-01T00:00:02Z", "stage": "train", "level": "info"},
        {"created_at": "2026-01-01T00:00:05Z", "stage": "train", "level": "info"},
    ]
    spans = stage_spans(events, "2026-01-01T00:00:09Z")
    assert [(s.stage, s.events, s.level) for s in spans] == [("validate", 2, "warning"), ("train", 2, "info")]
    assert (spans[0].end - spans[0].start).total_seconds() == 2
    assert (spans[1].end - spans[1].start).total_seconds() == 7
