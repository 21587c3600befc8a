"""Per-token inspection: what the teacher's values and shaping say about one response.

`inspect_response` runs the teacher over prompt ⊕ response (through the same
`tvkd.precompute.compute_pair_signals` that fills the value store, so the numbers are the ones
training would see) and returns, per response token, V_φ(s_t), ψ_t (with the method's γ,
terminal and shaping mode; α not applied), the teacher's log-probability of the token and, when
a student and its reference are given, β·(log π_θ − log π_ref). `render_table` prints that as a
terminal table, optionally as a heat map on a diverging blue–white–red scale centred at 0.

`InspectResult.to_dict()` is JSON-able: it is the body of the REST endpoint POST /v1/inspect.
The same result type is built from a job's stored samples (`samples.json`, chosen and rejected)
by `InspectResult.from_sample_side`, so the CLI and the dashboard render both the same way.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tvkd.config import MethodConfig, PrecomputeConfig
from tvkd.data import PreferencePair
from tvkd.logps import logits_logps
from tvkd.losses import shaping_terms
from tvkd.modeling import model_device
from tvkd.tokenize import TokenizedPair, tokenize_pair
from tvkd.values import map_boundary_values

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

Messages = Sequence[Mapping[str, str]]


@dataclass
class TokenSignal:
    """One response token: its text, id and the signals at its state s_t (index t−1)."""

    index: int
    id: int
    text: str
    value: float | None  # V_φ(s_t)
    psi: float | None  # ψ_t (γ/terminal/shaping of the method; α not applied)
    teacher_logp: float | None  # log π_φ(y_t | s_t); None when tokenizations differ
    logratio: float | None  # β·(log π_θ − log π_ref)(y_t | s_t); None without student + reference


@dataclass
class InspectResult:
    """Per-token signals of one response and their sums.

    `tokenization` says whose tokens the rows are: the teacher's, or the student's when a student
    with a different tokenizer was given (values then mapped onto the student's boundaries as in
    MATH.md, "different tokenizers", and the teacher's per-token log-prob is not defined).
    """

    prompt: str | list[dict[str, str]]
    response: str
    tokens: list[TokenSignal]
    sum_psi: float | None
    sum_logratio: float | None
    value_start: float | None  # V_φ(s_1), the state after the prompt
    value_end: float | None  # V_φ(s_{T+1}) as the teacher computes it (also with terminal="zero")
    method: dict[str, Any] = field(default_factory=dict)
    tokenization: Literal["teacher", "student"] = "teacher"
    side: str | None = None  # "chosen"/"rejected" when built from a stored sample

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite floats become None: JSON has no NaN or infinity)."""
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InspectResult:
        tokens = [TokenSignal(**t) for t in data.get("tokens", [])]
        rest = {k: v for k, v in data.items() if k != "tokens"}
        return cls(tokens=tokens, **rest)

    @classmethod
    def from_sample_side(cls, sample: Mapping[str, Any], side: str) -> InspectResult:
        """One side of a job's stored sample (samples.json: {index, row, prompt, chosen, rejected},
        each side {text, tokens: [{text, id, logratio, value, psi, teacher_logp}], sum_psi,
        sum_logratio, value_end}). Missing fields are None rather than an error, so samples of
        older jobs still render."""
        data = sample[side]
        tokens = [
            TokenSignal(
                index=int(t.get("index", k)),
                id=int(t.get("id", -1)),
                text=str(t.get("text", "")),
                value=_opt_float(t.get("value")),
                psi=_opt_float(t.get("psi")),
                teacher_logp=_opt_float(t.get("teacher_logp")),
                logratio=_opt_float(t.get("logratio")),
            )
            for k, t in enumerate(data.get("tokens", []))
        ]
        first_value = tokens[0].value if tokens else None
        return cls(
            prompt=sample.get("prompt", ""),
            response=str(data.get("text", "")),
            tokens=tokens,
            sum_psi=_opt_float(data.get("sum_psi")),
            sum_logratio=_opt_float(data.get("sum_logratio")),
            value_start=_opt_float(data.get("value_start", first_value)),
            value_end=_opt_float(data.get("value_end")),
            method=dict(sample.get("method", {}) or {}),
            tokenization="student",
            side=side,
        )


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Computing the signals


def _make_pair(prompt: str | Messages, response: str) -> PreferencePair:
    # compute_pair_signals takes a pair; the rejected side is a one-character stand-in (its
    # values are computed and dropped, which costs one short extra sequence in the batch).
    rejected = "." if response != "." else ","
    if isinstance(prompt, str):
        return PreferencePair(row=0, prompt=prompt, chosen=response, rejected=rejected)
    messages = []
    for i, m in enumerate(prompt):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"prompt[{i}] must be a message {{'role': str, 'content': str}}; got {m!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not messages:
        raise ValueError("prompt messages are empty")
    return PreferencePair(
        row=0, prompt="", chosen=response, rejected=rejected, prompt_messages=tuple(messages)
    )


def _token_texts(tokenizer: Any, response: str, ids: Sequence[int], ends: Sequence[int]) -> list[str]:
    """Each token's text: its slice of the response content (so the texts concatenate back to the
    response exactly), or the decoded token where the slice is empty (EOS/end-of-turn markup,
    or the second half of a character split across byte-level tokens)."""
    out, prev = [], 0
    for tok, end in zip(ids, ends, strict=True):
        piece = response[prev:end]
        out.append(piece if piece else tokenizer.decode([tok], skip_special_tokens=False))
        prev = max(prev, end)
    return out


@torch.no_grad()
def _response_logps(model: Any, tp: TokenizedPair) -> torch.Tensor:
    """log π(y_t | s_t) of the chosen side's response tokens (float32, [T]) from one forward."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([tp.prompt_ids + tp.chosen_ids], device=model_device(model))
        logits = model(input_ids=ids, use_cache=False).logits[0]
        p, t = len(tp.prompt_ids), len(tp.chosen_ids)
        # logits at position i predict token i+1: response token k is predicted at P−1+k.
        return logits_logps(logits[p - 1 : p - 1 + t], ids[0, p : p + t]).float().cpu()
    finally:
        model.train(was_training)


def inspect_response(
    teacher_model: Any,
    teacher_tokenizer: Any,
    prompt: str | Messages,
    response: str,
    *,
    method: MethodConfig | None = None,
    student_model: Any = None,
    reference_model: Any = None,
    student_tokenizer: Any = None,
    max_length: int = 2048,
) -> InspectResult:
    """Per-token teacher values, shaping ψ and (with student + reference) the DPO log-ratio.

    `prompt` is text or a list of chat messages (rendered with the tokenizers' chat templates).
    Rows follow the teacher's tokens, or the student's when `student_tokenizer` tokenizes the
    response differently. Raises `tvkd.data.RowError` when the pair cannot be tokenized (too
    long, template does not round-trip).
    """
    from tvkd.precompute import compute_pair_signals  # heavy module; only needed here

    method = method or MethodConfig()
    if (student_model is None) != (reference_model is None):
        raise ValueError("give both student_model and reference_model (the log-ratio needs both), or neither")
    pair = _make_pair(prompt, response)
    config = PrecomputeConfig(
        q_source=method.q_source,
        value_beta=method.value_beta,
        token_stats=True,
        max_length=max_length,
    )
    t_pair, values = compute_pair_signals(teacher_model, teacher_tokenizer, pair, config)
    t_values = torch.as_tensor(values.chosen_values, dtype=torch.float32)
    t_logps = torch.as_tensor(values.chosen_token_logps, dtype=torch.float32)
    t_logits = torch.as_tensor(values.chosen_token_logits, dtype=torch.float32)

    ids, ends, tokenizer = t_pair.chosen_ids, t_pair.chosen_ends, teacher_tokenizer
    tokenization: Literal["teacher", "student"] = "teacher"
    pot = t_values
    logratio: torch.Tensor | None = None
    if student_model is not None:
        s_tok = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
        s_pair = tokenize_pair(s_tok, pair, max_length=max_length)
        same = s_pair.chosen_ids == t_pair.chosen_ids and s_pair.chosen_ends == t_pair.chosen_ends
        if not same:
            # Rows become the student's tokens: the potential at each student boundary is the
            # teacher value at the latest teacher boundary at or before it (potential-based).
            pot = map_boundary_values(t_values, t_pair.chosen_ends, s_pair.chosen_ends)
            ids, ends, tokenizer, tokenization = s_pair.chosen_ids, s_pair.chosen_ends, s_tok, "student"
            t_logps = t_logits = None
        logratio = method.beta * (
            _response_logps(student_model, s_pair) - _response_logps(reference_model, s_pair)
        )

    n = len(ids)
    mask = torch.ones(1, n, dtype=torch.bool)
    if method.shaping in ("logprob", "logit") and t_logps is None:
        raise ValueError(
            f"shaping={method.shaping!r} is per teacher token; with a student tokenizer that "
            "differs from the teacher's it has no per-student-token value to show"
        )
    psi = shaping_terms(
        method.shaping,
        pot[None].double(),
        mask,
        gamma=method.gamma,
        terminal=method.terminal,
        teacher_logps=None if t_logps is None else t_logps[None].double(),
        teacher_logits=None if t_logits is None else t_logits[None].double(),
        value_beta=method.value_beta,
    )[0]

    texts = _token_texts(tokenizer, response, ids, ends)
    rows = [
        TokenSignal(
            index=k,
            id=int(ids[k]),
            text=texts[k],
            value=float(pot[k]),
            psi=float(psi[k]),
            teacher_logp=None if t_logps is None else float(t_logps[k]),
            logratio=None if logratio is None else float(logratio[k]),
        )
        for k in range(n)
    ]
    return InspectResult(
        prompt=list(map(dict, prompt)) if not isinstance(prompt, str) else prompt,
        response=response,
        tokens=rows,
        sum_psi=float(psi.sum()),
        sum_logratio=None if logratio is None else float(logratio.double().sum()),
        value_start=float(pot[0]),
        value_end=float(pot[n]),
        method=asdict(method),
        tokenization=tokenization,
    )


# --------------------------------------------------------------------------------------------
# Rendering


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


@dataclass
class SamplesFile:
    """A job's samples.json: the samples and what the trainer recorded about them."""

    samples: list[dict[str, Any]]
    step: int | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    teacher_logp_source: str | None = None
    note: str | None = None

    def find(self, index: int) -> dict[str, Any] | None:
        """The sample of pair `index` (the "index" field, not the position in the file)."""
        return next((s for s in self.samples if s.get("index") == index), None)

    def result(self, sample: Mapping[str, Any], side: str) -> InspectResult:
        result = InspectResult.from_sample_side(sample, side)
        if not result.method:
            result.method = dict(self.loss_options)
        return result


def load_samples(path: str | os.PathLike[str]) -> SamplesFile:
    """Read a job's samples.json; `path` may be the file or the run folder holding it. Accepts
    the trainer's document ({"step", "loss_options", "samples": [...], ...}) or a bare list."""
    p = Path(path)
    if p.is_dir():
        p = p / "samples.json"
    data = json.loads(p.read_text())
    if isinstance(data, list):
        return SamplesFile(samples=data)
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise ValueError(f"{p}: expected a samples document with a 'samples' list")
    return SamplesFile(
        samples=data["samples"],
        step=data.get("step"),
        loss_options=dict(data.get("loss_options") or {}),
        teacher_logp_source=data.get("teacher_logp_source"),
        note=data.get("note"),
    )
