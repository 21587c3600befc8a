"""Per-token samples of a trained student: `samples.json` for the inspector (dashboard heatmaps).

`write_samples` writes `tvkd.artifacts.SamplesFile`:

    {"version": 1, "step": int, "teacher_logp_source": "store" | "teacher" | null, "note": str | null,
     "loss_options": {alpha, beta, gamma, terminal, shaping, value_beta, length_normalize, sft_weight},
     "samples": [
       {"index": int, "row": int, "prompt": str | [messages],
        "chosen": {"text": str,
                   "tokens": [{"text", "id", "logratio", "value", "psi", "teacher_logp"}, ...],
                   "sum_psi": float, "sum_logratio": float, "value_end": float},
        "rejected": {...}}, ...]}

Per token t: logratio = β·(log π_θ − log π_ref), value = V(s_t) (the teacher's potential at the
state the token is chosen from, on the student's boundaries), psi = ψ_t as the loss uses it but
without α, teacher_logp = log π_φ(y_t | s_t) (null when teacher and student tokenizers differ:
a student token then has no teacher log-prob). value_end = V(s_{T+1}).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvkd.artifacts import Sample, SamplesFile, SampleSide, SampleToken, write_samples_file
from tvkd.batch import TrainPair, collate, policy_logps
from tvkd.config import PrecomputeConfig
from tvkd.data import PreferencePair, RowError
from tvkd.losses import shaping_terms
from tvkd.modeling import pad_token_id

SIDES = ("chosen", "rejected")


def _f64(x: np.ndarray | None) -> torch.Tensor:
    # A copy: store rows are read-only views of a memory-mapped file.
    return torch.from_numpy(np.array(x, dtype=np.float64))


def _teacher_logps(
    train_pairs: Sequence[TrainPair],
    pairs: Sequence[PreferencePair],
    *,
    teacher: str | None,
    same_tokenizer: bool,
    max_length: int | None,
    device: torch.device,
) -> tuple[list[dict[str, np.ndarray | None]], str | None, str | None]:
    """Per example and side, the teacher's log-prob of each student token; (logps, source, note)."""
    empty: list[dict[str, np.ndarray | None]] = [dict.fromkeys(SIDES) for _ in train_pairs]
    if teacher is None:
        return empty, None, "no teacher: the method does not use one (alpha=0 or shaping='none')"
    if not same_tokenizer:
        return (
            empty,
            None,
            (
                "teacher and student tokenizers differ: a student token has no teacher log-prob "
                "(values are the teacher's, mapped onto the student's token boundaries)"
            ),
        )
    if all(f"{s}_teacher_logps" in e.teacher for e in train_pairs for s in SIDES):
        return [{s: e.teacher[f"{s}_teacher_logps"] for s in SIDES} for e in train_pairs], "store", None
    # The store has no token stats: run the teacher on these few pairs only.
    from tvkd.models import load_causal_lm, load_tokenizer
    from tvkd.teacher import compute_pair_signals

    model = load_causal_lm(teacher, dtype=torch.float32, device=device)
    tokenizer = load_tokenizer(teacher)
    config = PrecomputeConfig(token_stats=True, max_length=max_length or 1024)
    out = []
    for e in train_pairs:
        try:
            _, pv = compute_pair_signals(model, tokenizer, pairs[e.index], config)
        except RowError:
            out.append(dict.fromkeys(SIDES))
            continue
        row: dict[str, np.ndarray | None] = {}
        for s in SIDES:
            logps = getattr(pv, f"{s}_token_logps")
            row[s] = logps if logps is not None and len(logps) == len(getattr(e, f"{s}_ids")) else None
        out.append(row)
    del model
    return out, "teacher", None


def _sample_side(
    e: TrainPair,
    side: str,
    policy: torch.Tensor,
    text: str,
    teacher_logps: np.ndarray | None,
    tokenizer: Any,
    opts: Mapping[str, Any],
) -> SampleSide:
    """One response of a sample, token by token (see the module doc), from the policy's log-probs
    `policy` [≥T] and the pair's reference log-probs, values and teacher statistics."""
    ids = getattr(e, f"{side}_ids")
    n = len(ids)
    logratio = opts["beta"] * (policy[:n].double().cpu() - _f64(getattr(e, f"ref_{side}")))
    values = _f64(getattr(e, f"{side}_values"))
    stats = {
        name: _f64(e.teacher[f"{side}_teacher_{name}"])[None]
        for name in ("logps", "logits")
        if f"{side}_teacher_{name}" in e.teacher
    }
    psi = shaping_terms(
        opts["shaping"],
        values[None],
        torch.ones(1, n, dtype=torch.bool),
        gamma=opts["gamma"],
        terminal=opts["terminal"],
        teacher_logps=stats.get("logps"),
        teacher_logits=stats.get("logits"),
        value_beta=opts["value_beta"],
        side=side,
        ended=torch.tensor([getattr(e, f"{side}_ended")]),
    )[0]
    tokens = [
        SampleToken(
            text=tokenizer.decode([int(tok)]),
            id=int(tok),
            logratio=float(logratio[t]),
            value=float(values[t]),
            psi=float(psi[t]),
            teacher_logp=None if teacher_logps is None else float(teacher_logps[t]),
        )
        for t, tok in enumerate(ids)
    ]
    return SampleSide(
        text=text,
        tokens=tokens,
        sum_psi=float(psi.sum()),
        sum_logratio=float(logratio.sum()),
        value_end=float(values[n]),
    )


@torch.no_grad()
def write_samples(
    path: str | os.PathLike,
    *,
    model: Any,
    tokenizer: Any,
    train_pairs: Sequence[TrainPair],
    pairs: Sequence[PreferencePair],
    loss_options: Mapping[str, Any],
    teacher: str | None = None,
    same_tokenizer: bool = True,
    teacher_max_length: int | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    step: int = 0,
) -> Path:
    """Per-token signals of `train_pairs` (with their reference log-probs) → `path` (see the module doc)."""
    device = torch.device(device)
    path = Path(path)
    opts = dict(loss_options)
    pad_id = pad_token_id(tokenizer)
    policy: tuple[torch.Tensor, torch.Tensor] | None = None
    if train_pairs:
        batch = collate(train_pairs, pad_id, device)
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                policy = policy_logps(model, batch)
        finally:
            model.train(was_training)
    teacher_lp, source, note = _teacher_logps(
        train_pairs,
        pairs,
        teacher=teacher,
        same_tokenizer=same_tokenizer,
        max_length=teacher_max_length,
        device=device,
    )
    samples = []
    for j, e in enumerate(train_pairs):
        assert policy is not None
        pair = pairs[e.index]
        sides = {
            side: _sample_side(
                e, side, policy[k][j], getattr(pair, side), teacher_lp[j][side], tokenizer, opts
            )
            for k, side in enumerate(SIDES)
        }
        prompt = [dict(m) for m in pair.prompt_messages] if pair.prompt_messages else pair.prompt
        samples.append(Sample(index=e.index, row=e.row, prompt=prompt, **sides))
    doc = SamplesFile(samples, step=step, loss_options=opts, teacher_logp_source=source, note=note)
    write_samples_file(path, doc)
    return path
