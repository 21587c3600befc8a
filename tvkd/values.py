"""Teacher soft values V_φ(s), shaping terms ψ, and the cross-tokenizer potential mapping.

MATH.md, "Teacher soft value":  V_φ(s) = β_v · logsumexp_a( Q_φ(s, a) / β_v ), with
Q = the raw logits z (`q_source="logits"`) or the log-probabilities z − logsumexp(z)
(`q_source="logprobs"`). Everything is computed exactly over the full vocabulary in float32,
a chunk of positions at a time, so the [positions × vocab] float32 matrix is never whole.
`q_source="implicit"` is not a function of one model's logits: `implicit_values` builds it from
the teacher's and its reference's token log-probabilities (V(s_1) = 0, then β_v·Σ log-ratios).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from tvkd.config import TERMINALS

DEFAULT_CHUNK = 256
# The value sources that are a logsumexp of one model's logits ("implicit" needs two models).
LOGIT_Q_SOURCES = ("logits", "logprobs")


def _check_q_source(q_source: str, value_beta: float) -> None:
    if q_source == "implicit":
        raise ValueError(
            "q_source='implicit' is not a function of one model's logits: compute the teacher's and "
            "its reference's token log-probs and call tvkd.values.implicit_values"
        )
    if q_source not in LOGIT_Q_SOURCES:
        raise ValueError(f"q_source must be one of {LOGIT_Q_SOURCES}; got {q_source!r}")
    if not value_beta > 0:
        raise ValueError(f"value_beta must be > 0; got {value_beta}")


def _values_of_logits(z: Tensor, q_source: str, value_beta: float) -> Tensor:
    """V for a float32 [n, vocab] block of logits (one chunk)."""
    v = value_beta * torch.logsumexp(z / value_beta, dim=-1) if value_beta != 1.0 else torch.logsumexp(z, -1)
    if q_source == "logprobs":
        # Q = z − lse(z)  ⇒  V = β_v·lse(z/β_v) − lse(z). At β_v = 1 both terms are the same
        # float computation, so V is exactly 0 (MATH.md property 4).
        v = v - torch.logsumexp(z, dim=-1)
    return v


def soft_values(
    logits: Tensor,
    *,
    q_source: str = "logits",
    value_beta: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """V_φ at every position of `logits` [..., vocab] (any float dtype) → float32 [...].

    Chunked over positions: at most `chunk_size × vocab` float32 values exist at once.
    """
    _check_q_source(q_source, value_beta)
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_size):
        z = flat[start : start + chunk_size].float()
        out[start : start + chunk_size] = _values_of_logits(z, q_source, value_beta)
    return out.reshape(logits.shape[:-1])


@dataclass
class TeacherSignals:
    """What the teacher contributes at a set of positions (all float32 except ids)."""

    values: Tensor  # [N] V_φ(s) at each position
    token_logps: Tensor | None = None  # [N] log π_φ(label | s)
    token_logits: Tensor | None = None  # [N] z_φ(s)[label]
    topk_logits: Tensor | None = None  # [N, k]
    topk_ids: Tensor | None = None  # [N, k] int64


@contextmanager
def _exact_tf32(hidden: Tensor, weight: Tensor) -> Iterator[None]:
    """TF32 tensor cores for the head matmul when that loses nothing.

    bf16 and fp16 mantissas (7 and 10 bits) fit in TF32's 10, so once 16-bit operands are upcast,
    a TF32 matmul forms every product exactly and accumulates in float32: the same numbers as a
    float32 matmul, several times faster on an H100. float32 operands keep full float32.
    """
    sixteen = (torch.bfloat16, torch.float16)
    if not (hidden.is_cuda and hidden.dtype in sixteen and weight.dtype in sixteen):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
def teacher_signals(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    q_source: str = "logits",
    value_beta: float = 1.0,
    topk: int = 0,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> TeacherSignals:
    """Teacher signals at N positions from final hidden states [N, H] and the LM head [V, H].

    The logits of one chunk of positions are formed in float32 (hidden and head upcast), used for
    every requested signal, and dropped: the full [N, V] matrix never exists. `labels` [N] (the
    next token at each position; −100 or any id where unused) enables token log-probs/logits.
    `softcap` applies Gemma-2-style final logit soft-capping z ← c·tanh(z/c) when the teacher has it.
    """
    _check_q_source(q_source, value_beta)
    with _exact_tf32(hidden, head_weight):
        return _teacher_signals(
            hidden, head_weight, head_bias, labels, q_source, value_beta, topk, softcap, chunk_size
        )


def _teacher_signals(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor | None,
    q_source: str,
    value_beta: float,
    topk: int,
    softcap: float | None,
    chunk_size: int,
) -> TeacherSignals:
    n = hidden.shape[0]
    dev = hidden.device
    w = head_weight.float()  # one upcast for the whole call, not one per chunk
    b = head_bias.float() if head_bias is not None else None
    values = torch.empty(n, dtype=torch.float32, device=dev)
    want_tokens = labels is not None
    tok_lp = torch.empty(n, dtype=torch.float32, device=dev) if want_tokens else None
    tok_lg = torch.empty(n, dtype=torch.float32, device=dev) if want_tokens else None
    k = min(topk, w.shape[0])
    tk_v = torch.empty(n, k, dtype=torch.float32, device=dev) if k else None
    tk_i = torch.empty(n, k, dtype=torch.int64, device=dev) if k else None
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        z = hidden[s:e].float() @ w.T
        if b is not None:
            z = z + b
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        values[s:e] = _values_of_logits(z, q_source, value_beta)
        if want_tokens:
            assert tok_lp is not None and tok_lg is not None and labels is not None
            lab = labels[s:e].clamp(min=0, max=z.shape[-1] - 1).unsqueeze(-1)
            picked = z.gather(-1, lab).squeeze(-1)
            tok_lg[s:e] = picked
            tok_lp[s:e] = picked - torch.logsumexp(z, dim=-1)
        if k:
            assert tk_v is not None and tk_i is not None
            tv, ti = z.topk(k, dim=-1)
            tk_v[s:e], tk_i[s:e] = tv, ti
    return TeacherSignals(values, tok_lp, tok_lg, tk_v, tk_i)


def implicit_values(teacher_logps: Tensor, reference_logps: Tensor, value_beta: float) -> Tensor:
    """V_φ at the T+1 states of one response for `q_source="implicit"` (MATH.md, "Teacher soft
    value"): V(s_1) = 0, V(s_{t+1}) = β_v · Σ_{k≤t} (log π_φ(y_k|s_k) − log π_φref(y_k|s_k)).

    `teacher_logps`, `reference_logps`: [T] log-probs of the response tokens under the teacher and
    the model it was DPO-trained from (same tokenizer). The running sum is taken in float64, so
    the stored float32 values carry no accumulated rounding. Returns float32 [T+1].
    """
    if teacher_logps.shape != reference_logps.shape or teacher_logps.dim() != 1:
        raise ValueError(
            f"teacher and reference log-probs must be the same [T] shape; got "
            f"{tuple(teacher_logps.shape)} and {tuple(reference_logps.shape)}"
        )
    if not value_beta > 0:
        raise ValueError(f"value_beta must be > 0; got {value_beta}")
    ratio = teacher_logps.double() - reference_logps.double()
    out = torch.zeros(ratio.shape[0] + 1, dtype=torch.float64, device=ratio.device)
    out[1:] = value_beta * torch.cumsum(ratio, 0)
    return out.float()


def shaping_from_values(
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    terminal: str = "model",
    ended: Tensor | None = None,
) -> Tensor:
    """ψ_t = γ·V(s_{t+1}) − V(s_t) for t = 1..T_b of each row, zero elsewhere.

    values [B, T+1] (index t−1 holds V(s_t); index T_b holds the terminal V(s_{T_b+1}));
    mask [B, T] bool, True on the row's T_b response tokens, contiguous from index 0.
    With terminal="zero", V(s_{T_b+1}) := 0. With terminal="pre_eos", V(s_{T_b+1}) := V(s_{T_b})
    for the rows whose response ends with its end-of-response token: `ended` [B] bool, None =
    every row (what `tvkd.tokenize.tokenize_pair` guarantees unless a response was truncated).
    Returns [B, T] in the dtype of `values`, detached.
    """
    if terminal not in TERMINALS:
        raise ValueError(f"terminal must be one of {TERMINALS}; got {terminal!r}")
    values = values.detach()
    if values.shape[-1] != mask.shape[-1] + 1:
        raise ValueError(
            f"values must have one more column than the mask (V at T+1 states); "
            f"got values {tuple(values.shape)} and mask {tuple(mask.shape)}"
        )
    current, nxt = values[:, :-1], values[:, 1:]
    if terminal in ("zero", "pre_eos"):
        lengths = mask.sum(-1, keepdim=True)
        positions = torch.arange(mask.shape[-1], device=mask.device).unsqueeze(0)
        last = positions == lengths - 1  # [B, T]: the row's last token (its end token)
        if terminal == "zero":
            nxt = torch.where(last, torch.zeros_like(nxt), nxt)
        else:
            if ended is not None:
                if ended.shape != (mask.shape[0],) or ended.dtype != torch.bool:
                    raise ValueError(f"ended must be a bool [B] = [{mask.shape[0]}] tensor")
                last = last & ended.to(mask.device).unsqueeze(-1)
            nxt = torch.where(last, current, nxt)
    psi = gamma * nxt - current
    return torch.where(mask, psi, torch.zeros_like(psi))


def map_boundary_values(
    teacher_values: Sequence[float] | Tensor,
    teacher_ends: Sequence[int],
    student_ends: Sequence[int],
) -> Tensor:
    """Potentials at the student's T_s+1 state boundaries from the teacher's T_t+1 values.

    MATH.md "different tokenizers": the potential at a student boundary is the teacher value at
    the latest teacher boundary at or before it. Boundaries are character positions in the
    response content: boundary 0 is the prompt end (position 0); boundary k ≥ 1 is the end of
    response token k (`*_ends[k−1]`, non-decreasing). The student's final boundary (after its last
    token) maps to the teacher's final value, so with γ = 1 the per-response Σψ equals
    V_φ(end) − V_φ(prompt end) exactly. Identical tokenizations give the identity.
    """
    tv = torch.as_tensor(teacher_values, dtype=torch.float32)
    t_len, s_len = len(teacher_ends), len(student_ends)
    if tv.shape[0] != t_len + 1:
        raise ValueError(f"teacher has {t_len} tokens but {tv.shape[0]} values (want {t_len + 1})")
    if list(teacher_ends) == list(student_ends):
        return tv.clone()
    if s_len == 0 or t_len == 0:
        raise ValueError("responses must have at least one token (the EOS counts)")
    # Teacher boundaries 0..t_len−1 are eligible for interior student boundaries; the final
    # teacher boundary is reserved for the student's final boundary (both mean "after the end").
    t_pos = torch.tensor([0, *list(teacher_ends)[:-1]], dtype=torch.long)
    s_pos = torch.tensor([0, *list(student_ends)[:-1]], dtype=torch.long)
    # latest teacher boundary j with t_pos[j] <= s_pos[k]: searchsorted(right) − 1 (t_pos is sorted).
    idx = (torch.searchsorted(t_pos, s_pos, right=True) - 1).clamp(min=0)
    idx[0] = 0  # the prompt end maps to the teacher's prompt end, whatever markup follows it
    out = torch.empty(s_len + 1, dtype=torch.float32)
    out[:s_len] = tv[idx]
    out[s_len] = tv[t_len]
    return out
