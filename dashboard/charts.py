"""Plotly figures of what the API serves: metric curves (`/metrics/series`), the same metric of
several jobs overlaid, and a job's stage timeline drawn from its events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import plotly.graph_objects as go

from dashboard.formatting import parse_time

Series = dict[tuple[str, str], tuple[list[int], list[float | None]]]
SPLIT_STYLE = {"train": {"mode": "lines+markers"}, "eval": {"mode": "lines+markers", "line": {"dash": "dot"}}}
HEIGHT = 300


def index_series(data: Iterable[Mapping[str, Any]]) -> Series:
    """(split, name) → (steps, values) from the API's metric series."""
    return {(s["split"], s["name"]): (list(s["steps"]), list(s["values"])) for s in data}


def names_in(series: Series) -> list[str]:
    return sorted({name for _, name in series})


def _layout(fig: go.Figure, title: str, *, ytitle: str = "") -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0, "font": {"size": 15}},
        height=HEIGHT,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis_title="step",
        yaxis_title=ytitle,
        legend={"orientation": "h", "y": -0.25},
        hovermode="x unified",
    )
    return fig


def metric_figure(series: Series, names: Sequence[str], title: str) -> go.Figure | None:
    """One figure with a trace per (name, split) present; None when none of `names` was logged."""
    fig = go.Figure()
    for name in names:
        for split in ("train", "eval"):
            if (split, name) not in series:
                continue
            steps, values = series[(split, name)]
            fig.add_trace(go.Scatter(x=steps, y=values, name=f"{name} ({split})", **SPLIT_STYLE[split]))
    if not fig.data:
        return None
    return _layout(fig, title)


def overlay_figure(per_job: Sequence[tuple[str, Series]], name: str, split: str) -> go.Figure | None:
    """The metric `name` of several jobs on one set of axes (one trace per job)."""
    fig = go.Figure()
    for label, series in per_job:
        if (split, name) in series:
            steps, values = series[(split, name)]
            fig.add_trace(go.Scatter(x=steps, y=values, name=label, mode="lines+markers"))
    if not fig.data:
        return None
    return _layout(fig, f"{name} ({split})")


@dataclass
class StageSpan:
    stage: str
    start: datetime
    end: datetime
    events: int
    level: str  # the worst level among its events


LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}
LEVEL_COLOURS = {"info": "#3b82f6", "debug": "#9ca3af", "warning": "#f59e0b", "error": "#dc2626"}


def stage_spans(events: Sequence[Mapping[str, Any]], finished_at: str | None) -> list[StageSpan]:
    """Consecutive runs of events of one stage, each lasting until the next begins (the last until
    the job finished, or now while it runs). A stage that ran twice (a resumed job) shows twice."""
    spans: list[StageSpan] = []
    for event in events:
        at = parse_time(event.get("created_at"))
        if at is None:
            continue
        stage = event.get("stage") or (spans[-1].stage if spans else "submit")
        level = str(event.get("level") or "info")
        if spans and spans[-1].stage == stage:
            span = spans[-1]
            span.end, span.events = at, span.events + 1
            if LEVELS.get(level, 1) > LEVELS.get(span.level, 1):
                span.level = level
            continue
        if spans:
            spans[-1].end = at
        spans.append(StageSpan(stage, at, at, 1, level))
    if spans:
        last = parse_time(finished_at) or datetime.now(UTC)
        spans[-1].end = max(spans[-1].end, last)
    return spans


def timeline_figure(spans: Sequence[StageSpan]) -> go.Figure | None:
    if not spans:
        return None
    fig = go.Figure()
    for span in spans:
        ms = max((span.end - span.start).total_seconds() * 1000, 1.0)
        fig.add_trace(
            go.Bar(
                y=[span.stage],
                x=[ms],
                base=[span.start.isoformat()],
                orientation="h",
                marker_color=LEVEL_COLOURS.get(span.level, LEVEL_COLOURS["info"]),
                name=span.stage,
                showlegend=False,
                hovertemplate=f"{span.stage}: {ms / 1000:.2f} s, {span.events} events<extra></extra>",
            )
        )
    order = list(dict.fromkeys(s.stage for s in spans))
    fig.update_layout(
        height=60 + 34 * len(order),
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        xaxis={"type": "date"},
        yaxis={"categoryorder": "array", "categoryarray": order[::-1]},
        barmode="overlay",
    )
    return fig
