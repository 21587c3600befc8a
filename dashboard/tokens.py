"""Token heat maps: a response's tokens as HTML spans coloured on a diverging scale by one
per-token signal the API served (ψ_t, V(s_t), or β·log-ratio), with the three largest-ψ tokens
outlined and a tooltip per token carrying every signal.

Pure functions of the API's token objects (`{index, id, text, value, psi, teacher_logp,
logratio}`), so they are tested without Streamlit. Every piece of model text is HTML-escaped:
token text is data, never markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plotly.colors import sample_colorscale

COLORSCALE = "RdBu"  # diverging: red below zero, white at zero, blue above
NA_COLOUR = "#e5e7eb"
TOP_OUTLINE = "#f59e0b"
TOP_N = 3
TOKENS_PER_PAGE = 400  # a response longer than this is shown a page at a time


@dataclass(frozen=True)
class Signal:
    key: str
    label: str
    legend: str


SIGNALS: dict[str, Signal] = {
    "psi": Signal(
        "psi", "ψ_t (shaping)", "ψ_t = γ·V(s_{t+1}) − V(s_t): the teacher's shaping term (α not applied)"
    ),
    "value": Signal(
        "value",
        "V(s_t) (teacher value)",
        "V(s_t) − V(s_1): the teacher's soft value, centred at the prompt's value V(s_1) = {centre}; "
        "V itself barely moves along a response, so uncentred it would be one colour",
    ),
    "logratio": Signal(
        "logratio",
        "β·log-ratio (student)",
        "β·(log π_θ − log π_ref): how much the trained student moved towards (blue) or away from "
        "(red) this token",
    ),
}


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def signal_values(
    tokens: Sequence[Mapping[str, Any]], signal: str, centre: float | None
) -> list[float | None]:
    """The number each token is coloured by; V is taken relative to `centre` (V(s_1))."""
    out: list[float | None] = []
    for token in tokens:
        x = _finite(token.get(signal))
        if signal == "value":
            c = _finite(centre)
            x = None if x is None or c is None else x - c
        out.append(x)
    return out


def scale_of(*series: Sequence[float | None]) -> float:
    """The symmetric colour range: the largest |value| over all series (chosen and rejected share
    one scale, so their colours compare)."""
    biggest = max((abs(x) for s in series for x in s if x is not None), default=0.0)
    return biggest


def colour(x: float | None, scale: float) -> tuple[str, str]:
    """(background, text colour) of a value on the diverging scale."""
    if x is None:
        return NA_COLOUR, "#374151"
    t = 0.5 if scale <= 0 else 0.5 + 0.5 * max(-1.0, min(1.0, x / scale))
    background = sample_colorscale(COLORSCALE, [t])[0]
    return background, "#ffffff" if abs(t - 0.5) > 0.32 else "#111827"


def top_psi(tokens: Sequence[Mapping[str, Any]], n: int = TOP_N) -> dict[int, int]:
    """Token index → rank (1 = largest ψ) of the `n` tokens with the largest ψ."""
    scored = [(x, i) for i, t in enumerate(tokens) if (x := _finite(t.get("psi"))) is not None]
    scored.sort(key=lambda p: (-p[0], p[1]))
    return {i: rank for rank, (_, i) in enumerate(scored[:n], 1)}


def _fmt(x: Any, digits: int = 5) -> str:
    v = _finite(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def tooltip(token: Mapping[str, Any], rank: int | None = None) -> str:
    lines = [
        f"text: {token.get('text', '')!r}",
        f"id: {token.get('id')}   position: {token.get('index')}",
        f"ψ_t: {_fmt(token.get('psi'))}",
        f"V(s_t): {_fmt(token.get('value'), 7)}",
        f"β·log-ratio: {_fmt(token.get('logratio'))}",
        f"teacher log p: {_fmt(token.get('teacher_logp'))}",
    ]
    if rank is not None:
        lines.append(f"top-{rank} ψ of this response")
    return "\n".join(lines)


def _visible(text: str) -> str:
    """Token text as shown: a newline keeps its line break but gets a mark; an empty token a
    placeholder, so that it can still be hovered."""
    if text == "":
        return "∅"
    return text.replace("\n", "↵\n")


def tokens_html(
    tokens: Sequence[Mapping[str, Any]],
    values: Sequence[float | None],
    scale: float,
    top: Mapping[int, int],
    *,
    side: str,
    start: int = 0,
    stop: int | None = None,
) -> str:
    """The spans of tokens[start:stop] (a page of a long response); `top` ranks index the whole
    response, so the highlight does not depend on the page."""
    stop = len(tokens) if stop is None else min(stop, len(tokens))
    spans = []
    for i in range(start, stop):
        token = tokens[i]
        background, fg = colour(values[i], scale)
        rank = top.get(i)
        style = f"background:{background};color:{fg};border-radius:3px;padding:1px 1px;"
        classes = "tvkd-tok"
        extra = ""
        if rank is not None:
            classes += " tvkd-top"
            style += f"outline:2px solid {TOP_OUTLINE};outline-offset:1px;font-weight:700;"
            extra = (
                f'<sup class="tvkd-rank" style="color:{TOP_OUTLINE};font-weight:700;'
                f'font-size:0.65em;margin-left:1px;">{rank}</sup>'
            )
        spans.append(
            f'<span class="{classes}" data-index="{i}" data-value="{_fmt(values[i], 6)}" '
            f'title="{html.escape(tooltip(token, rank), quote=True)}" style="{style}">'
            f"{html.escape(_visible(str(token.get('text', ''))), quote=True)}</span>{extra}"
        )
    body = "".join(spans)
    return (
        f'<div class="tvkd-response" data-side="{html.escape(side, quote=True)}" '
        'style="font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:1.05rem;'
        'line-height:2.1;white-space:pre-wrap;word-break:break-word;">'
        f"{body}</div>"
    )


def legend_html(signal: str, scale: float, centre: float | None = None) -> str:
    """A colour bar from −scale to +scale with what the colours mean."""
    stops = ", ".join(sample_colorscale(COLORSCALE, [i / 10 for i in range(11)]))
    text = SIGNALS[signal].legend.replace("{centre}", _fmt(centre, 6))
    low, high = (f"−{scale:.3g}", f"+{scale:.3g}") if scale > 0 else ("0", "0")
    return (
        '<div class="tvkd-legend" style="font-size:0.85rem;margin:0.25rem 0 0.75rem 0;">'
        f"<div>{html.escape(text)}</div>"
        '<div style="display:flex;align-items:center;gap:0.5rem;margin-top:0.25rem;">'
        f"<span>{low}</span>"
        f'<span style="flex:0 0 220px;height:12px;border-radius:3px;'
        f'background:linear-gradient(to right, {stops});"></span>'
        f"<span>{high}</span>"
        f'<span style="margin-left:1rem;outline:2px solid {TOP_OUTLINE};padding:0 4px;'
        'border-radius:3px;font-weight:700;">tok</span>'
        f"<span>the {TOP_N} tokens with the largest ψ (rank as superscript)</span>"
        f'<span style="margin-left:1rem;background:{NA_COLOUR};padding:0 4px;border-radius:3px;">'
        "grey</span><span>no value</span>"
        "</div></div>"
    )
