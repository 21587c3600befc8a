"""Per-token inspection: what the teacher's values and shaping say about one response.

`inspect_response` runs the teacher over prompt ⊕ response (through the same
`tvkd.teacher.compute_pair_signals` that fills the value store, so the numbers are the ones
training would see) and returns, per response token, V_φ(s_t), ψ_t (with the method's γ,
terminal and shaping mode; α not applied), the teacher's log-probability of the token and, when
a student and its reference are given, β·(log π_θ − log π_ref).

The result type, `tvkd.artifacts.InspectResult`, is torch-free and JSON-able: it is the body of
POST /v1/inspect, and a job's stored samples are read into it too (`SamplesFile.result`), so the
CLI (`tvkd.render.render_table`) and the dashboard show both the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch

from tvkd.artifacts import InspectResult, TokenSignal
from tvkd.config import MethodConfig, PrecomputeConfig
from tvkd.data import PreferencePair
from tvkd.logps import logits_logps
from tvkd.losses import shaping_terms
from tvkd.modeling import model_device
from tvkd.tokenize import TokenizedPair, tokenize_pair
from tvkd.values import map_boundary_values

Messages = Sequence[Mapping[str, str]]


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
    teacher_reference_model: Any = None,
) -> InspectResult:
    """Per-token teacher values, shaping ψ and (with student + reference) the DPO log-ratio.

    `teacher_reference_model`: the model the teacher was DPO-trained from (same tokenizer),
    required by `method.q_source == "implicit"` (V = β_v·Σ log π_φ/π_φref; MATH.md).

    `prompt` is text or a list of chat messages (rendered with the tokenizers' chat templates).
    Rows follow the teacher's tokens, or the student's when `student_tokenizer` tokenizes the
    response differently. Raises `tvkd.data.RowError` when the pair cannot be tokenized (too
    long, template does not round-trip).
    """
    from tvkd.teacher import compute_pair_signals  # heavy module; only needed here

    method = method or MethodConfig()
    if method.q_source == "implicit" and teacher_reference_model is None:
        raise ValueError("q_source='implicit' needs the teacher's reference model (teacher_reference)")
    if (student_model is None) != (reference_model is None):
        raise ValueError("give both student_model and reference_model (the log-ratio needs both), or neither")
    pair = _make_pair(prompt, response)
    config = PrecomputeConfig(
        q_source=method.q_source,
        value_beta=method.value_beta,
        token_stats=True,
        max_length=max_length,
    )
    t_pair, values = compute_pair_signals(
        teacher_model, teacher_tokenizer, pair, config, reference=teacher_reference_model
    )
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
