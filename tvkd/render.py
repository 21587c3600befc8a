"""A terminal table of per-token signals, optionally as a heat map.

`render_table` prints an `InspectResult` (from `tvkd.inspect.inspect_response` or a job's
samples, `tvkd.artifacts.SamplesFile.result`) one line per response token: V(s_t), ψ_t, the
teacher's log-prob and β·log-ratio, with the chosen signal on a diverging blue–white–red scale
centred at 0. Token texts are made visible and safe (`visible`: no terminal escapes pass
through). Standard library only.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Literal

from tvkd.artifacts import InspectResult

SIGNALS = ("psi", "value", "logratio", "teacher_logp")
Signal = Literal["psi", "value", "logratio", "teacher_logp"]
TOP_MARK = "★"
TOP_K = 3

# Diverging scale (ColorBrewer RdBu ends): negative → blue, 0 → white, positive → red.
_BLUE = (33, 102, 172)
_WHITE = (255, 255, 255)
_RED = (178, 24, 43)
_RESET = "\x1b[0m"
_TOKEN_WIDTH = 18


def visible(text: str) -> str:
    """Token text made safe and visible in a terminal cell: spaces as '␣', newlines and tabs as
    escapes, every other control/format character (ESC included: no terminal injection) as
    \\xNN/\\uNNNN, the empty string as '∅'."""
    if not text:
        return "∅"
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif unicodedata.category(ch)[0] in "CZ":  # controls, format, unassigned, odd spaces
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _width(text: str) -> int:
    """Terminal columns of `text` (wide East Asian characters take two, combining marks none)."""
    w = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


def _fit(text: str, width: int) -> str:
    """Truncate to `width` columns (with '…') and left-justify to exactly `width` columns."""
    if _width(text) > width:
        out, w = "", 0
        for ch in text:
            cw = _width(ch)
            if w + cw > width - 1:
                break
            out, w = out + ch, w + cw
        text = out + "…"
    return text + " " * (width - _width(text))


def diverging_rgb(x: float, scale: float) -> tuple[int, int, int]:
    """Blue (−scale) → white (0) → red (+scale), linear, clamped."""
    if scale <= 0 or not math.isfinite(x):
        return _WHITE
    t = max(-1.0, min(1.0, x / scale))
    end = _RED if t > 0 else _BLUE
    a = abs(t)
    r, g, b = (round(w + (e - w) * a) for w, e in zip(_WHITE, end, strict=True))
    return r, g, b


def _paint(text: str, rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    # Black text on the 24-bit background, so light cells stay readable on dark terminals.
    return f"\x1b[38;2;0;0;0;48;2;{r};{g};{b}m{text}{_RESET}"


def _num(x: float | None, width: int = 9) -> str:
    return (f"{x:+.4f}" if x is not None and math.isfinite(x) else "—").rjust(width)


_SIGNAL_LABEL = {"psi": "ψ_t", "value": "V(s_t)", "logratio": "β·logratio", "teacher_logp": "log π_T"}


def render_table(result: InspectResult, *, color: bool, signal: Signal = "psi") -> str:
    """One line per response token: index, token (visible), id, V(s_t), ψ_t, teacher log-prob,
    β·log-ratio (when known), and a mark on the three largest ψ_t. With `color`, the token and
    the chosen signal's cell get a 24-bit background on a blue–white–red scale centred at 0 and
    scaled to the largest |signal| of the response; without, plain text only."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")
    sig_vals = [getattr(t, signal) for t in result.tokens]
    if result.tokens and all(v is None for v in sig_vals):
        raise ValueError(f"signal {signal!r} is not available for this response")
    finite = [abs(v) for v in sig_vals if v is not None and math.isfinite(v)]
    scale = max(finite, default=0.0)
    psis = [(t.psi, t.index) for t in result.tokens if t.psi is not None and math.isfinite(t.psi)]
    top = {i for _, i in sorted(psis, key=lambda p: (-p[0], p[1]))[:TOP_K]}
    show_lr = any(t.logratio is not None for t in result.tokens)

    cols = ["    #", _fit("token", _TOKEN_WIDTH), "    id", "   V(s_t)", "      ψ_t", "  log π_T"]
    if show_lr:
        cols.append("β·logratio".rjust(10))
    lines = []
    title = f"{result.side} response" if result.side else "response"
    lines.append(
        f"{title}: {len(result.tokens)} tokens ({result.tokenization} tokenization); "
        f"colour: {_SIGNAL_LABEL[signal]}, scale ±{scale:.4g}"
    )
    header = "  ".join(cols) + "  top"
    lines += [header, "-" * _width(header)]
    for t, v in zip(result.tokens, sig_vals, strict=True):
        token = _fit(visible(t.text), _TOKEN_WIDTH)
        cells = {
            "value": _num(t.value),
            "psi": _num(t.psi),
            "teacher_logp": _num(t.teacher_logp),
            "logratio": _num(t.logratio, 10),
        }
        if color and v is not None:
            rgb = diverging_rgb(v, scale)
            token = _paint(token, rgb)
            cells[signal] = _paint(cells[signal], rgb)
        row = [f"{t.index:5d}", token, f"{t.id:6d}", cells["value"], cells["psi"], cells["teacher_logp"]]
        if show_lr:
            row.append(cells["logratio"])
        row.append(f" {TOP_MARK}" if t.index in top else "")
        lines.append("  ".join(row).rstrip())
    lines.append("-" * _width(header))
    summary = [
        f"Σψ = {_num(result.sum_psi, 0).strip()}",
        f"V(s_1) = {_num(result.value_start, 0).strip()}",
        f"V(s_T+1) = {_num(result.value_end, 0).strip()}",
    ]
    if result.sum_logratio is not None:
        summary.append(f"Σ β·logratio = {_num(result.sum_logratio, 0).strip()}")
    lines.append("  ".join(summary))
    if top:
        lines.append(f"top: the {len(top)} tokens with the largest ψ_t are marked")
    return "\n".join(lines)
