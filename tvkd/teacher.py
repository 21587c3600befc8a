"""The teacher forward: V_φ (and optional token statistics) at every response state of a batch.

For a response of T tokens after a prompt of P tokens (teacher tokenization), the teacher's
next-token logits at positions P−1 … P+T−1 are its logits at the states s_1 … s_{T+1}; V there
gives the T+1 values of MATH.md, and the first T positions (label = the response token) give
the optional token log-prob/logit. Only the decoder runs over the batch; the LM head is applied
by `tvkd.values.teacher_signals` to the response rows alone, a chunk at a time, so full
[tokens × vocab] logits never exist. That needs a plain linear head (`tvkd.modeling.head_problem`,
soft-capping reproduced), which `verify_head` also checks numerically once per model.

`compute_pair_signals` runs one pair (the inspector, evaluation samples); the dataset pass
(`tvkd.precompute`) packs many into batches with `batches_by_tokens` and `run_batch`.

`q_source="implicit"` runs a second model over the same batch, the teacher's reference (the
model it was DPO-trained from, same tokenizer): both give the log-prob of each response token,
and V is the running sum of their difference (`tvkd.values.implicit_values`). Top-k and token
statistics stay the teacher's.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tvkd.config import PrecomputeConfig
from tvkd.data import PreferencePair
from tvkd.modeling import decoder_hidden, head_problem, model_device, output_head, pad_token_id, softcap_of
from tvkd.numerics import NonFiniteError
from tvkd.store import SIDES, PairValues
from tvkd.tokenize import TokenizedPair, tokenize_pair
from tvkd.values import TeacherSignals, implicit_values, teacher_signals

# Relative tolerance of the one-off check that our head reproduces the model's own logits.
_HEAD_CHECK_RTOL = 1e-3
_HEAD_CHECK_TOKENS = 16


class UnsupportedTeacher(ValueError):
    """The teacher's output head is not one the hidden-state path reproduces exactly."""


@dataclass
class TeacherSequence:
    """One side of one pair, laid out prompt ⊕ response."""

    slot: int  # position of the pair within its shard
    side: str
    ids: list[int]
    prompt_len: int


def _decoder_and_head(model: Any) -> tuple[Any, Tensor, Tensor | None, float | None]:
    """(decoder module, head weight [V, H], head bias or None, soft-cap or None)."""
    problem = head_problem(model, softcap_ok=True)
    if problem is not None:
        raise UnsupportedTeacher(
            f"teacher {type(model).__name__}: {problem}, which the precompute does not reproduce"
        )
    return (*output_head(model), softcap_of(model))


# Models whose head verify_head has accepted (weakly held: a dropped model is forgotten).
_VERIFIED: weakref.WeakSet[Any] = weakref.WeakSet()


@torch.inference_mode()
def verify_head(model: Any, input_ids: Tensor) -> None:
    """Check once that decoder hidden states + our head give the model's own logits.

    Catches any head transform the attribute list misses (a scale, an extra norm) at the cost of
    one forward of a few tokens, in float32 with autocast off. Raises UnsupportedTeacher when they
    differ (or the difference is NaN), `tvkd.numerics.NonFiniteError` when the logits are not
    finite.
    """
    decoder, w, b, softcap = _decoder_and_head(model)
    ids = input_ids[:, :_HEAD_CHECK_TOKENS]
    mask = torch.ones_like(ids)
    with torch.autocast(ids.device.type, enabled=False):
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()
        hidden = decoder_hidden(decoder, ids, mask)[0]
    got = hidden.float() @ w.float().T
    if b is not None:
        got = got + b.float()
    if softcap:
        got = softcap * torch.tanh(got / softcap)
    if not bool(torch.isfinite(want).all()):
        raise NonFiniteError(
            "nonfinite_teacher",
            f"{type(model).__name__}: the model's own logits hold NaN/Inf on the head-check tokens "
            "(weights damaged or overflowing)",
        )
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    if not err <= _HEAD_CHECK_RTOL * scale:  # a NaN error fails too
        raise UnsupportedTeacher(
            f"{type(model).__name__}: decoder hidden states × output head differ from the model's "
            f"logits (max abs error {err:.3g} at logit scale {scale:.3g}); its head is not supported"
        )
    _VERIFIED.add(model)


def verify_once(model: Any, ids: Sequence[int]) -> None:
    if model not in _VERIFIED:
        verify_head(model, torch.tensor([list(ids)], device=model_device(model)))


@torch.inference_mode()
def _forward_flat(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    spans: Sequence[tuple[int, int]],
    config: PrecomputeConfig,
) -> TeacherSignals:
    """The signals of every span's positions, rows back to back (span r: n_r entries)."""
    decoder, w, b, softcap = _decoder_and_head(model)
    dev = input_ids.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16):
        hidden = decoder_hidden(decoder, input_ids, attention_mask)
    counts = torch.tensor([n for _, n in spans], device=dev)
    rows = torch.repeat_interleave(torch.arange(len(spans), device=dev), counts)
    starts = torch.repeat_interleave(torch.tensor([s for s, _ in spans], device=dev), counts)
    offsets = torch.arange(int(counts.sum()), device=dev) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    cols = starts + offsets
    labels = None
    implicit = config.q_source == "implicit"
    if config.token_stats or implicit:
        nxt = (cols + 1).clamp(max=input_ids.shape[1] - 1)
        labels = torch.where(offsets == counts[rows] - 1, -100, input_ids[rows, nxt])
    # Outside autocast: the head runs in float32 whatever precision the decoder ran in.
    return teacher_signals(
        hidden[rows, cols],
        w,
        b,
        labels=labels,
        # "implicit": these logsumexp values are unused (run_batch replaces them).
        q_source="logits" if implicit else config.q_source,
        value_beta=config.value_beta,
        topk=config.topk,
        softcap=softcap,
        chunk_size=config.chunk_size,
    )


def teacher_forward_signals(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    spans: Sequence[tuple[int, int]],
    config: PrecomputeConfig,
) -> list[TeacherSignals]:
    """One batched forward; per row r, the signals at positions [start_r, start_r + n_r).

    spans[r] = (start_r, n_r). Rows are right-padded (attention_mask 1 on real tokens). The label
    of position p is token p+1 (token stats), so a span's last position, meant to be the state
    after the whole response, gets none (its token stats are meaningless; −100 is passed).
    """
    flat = _forward_flat(model, input_ids, attention_mask, spans, config)
    sizes = [n for _, n in spans]
    parts = {name: (None if t is None else t.split(sizes)) for name, t in vars(flat).items()}
    return [
        TeacherSignals(**{name: (None if p is None else p[r]) for name, p in parts.items()})
        for r in range(len(spans))
    ]


def _pad_batch(seqs: Sequence[TeacherSequence], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        mask[r, : len(s.ids)] = 1
    return ids.to(device), mask.to(device)


def run_batch(
    model: Any,
    seqs: Sequence[TeacherSequence],
    config: PrecomputeConfig,
    pad_id: int,
    device: torch.device,
    reference: Any = None,
) -> list[dict[str, np.ndarray]]:
    """Store arrays of each sequence of the batch (keys `<side>_values`, ...). `reference` is the
    teacher's reference model, required by (and only used for) `q_source="implicit"`."""
    implicit = config.q_source == "implicit"
    if implicit and reference is None:
        raise ValueError("q_source='implicit' needs the teacher's reference model (teacher_reference)")
    ids, mask = _pad_batch(seqs, pad_id, device)
    # V(s_1) is at the last prompt position; T+1 states in all.
    spans = [(s.prompt_len - 1, len(s.ids) - s.prompt_len + 1) for s in seqs]
    flat = _forward_flat(model, ids, mask, spans, config)
    # One device→host copy per field for the whole batch; rows are then copied out of it so that
    # a stored row owns its memory (a view would pin the whole batch until its shard is written).
    host = {name: t.cpu().numpy() for name, t in vars(flat).items() if t is not None}
    bounds = np.cumsum([0] + [n for _, n in spans])
    rows = [{name: a[bounds[r] : bounds[r + 1]] for name, a in host.items()} for r in range(len(seqs))]
    if implicit:
        ref_ids, ref_mask = ids.to(model_device(reference)), mask.to(model_device(reference))
        ref_config = dataclasses.replace(config, topk=0, token_stats=True)
        ref_lp = _forward_flat(reference, ref_ids, ref_mask, spans, ref_config).token_logps
        assert ref_lp is not None
        ref_host = ref_lp.cpu().numpy()
        for r, row in enumerate(rows):
            # The span's last position is the state after the response: it has no token.
            teacher_lp = torch.from_numpy(row["token_logps"][:-1])
            ref_row = torch.from_numpy(ref_host[bounds[r] : bounds[r + 1] - 1])
            row["values"] = implicit_values(teacher_lp, ref_row, config.value_beta).numpy()
            if not config.token_stats:
                del row["token_logps"], row["token_logits"]
    return [_side_arrays(row, s.side) for row, s in zip(rows, seqs, strict=True)]


def batches_by_tokens(seqs: list[TeacherSequence], batch_tokens: int) -> list[list[TeacherSequence]]:
    """Longest first (an out-of-memory shows at once), each batch ≤ batch_tokens padded tokens."""
    order = sorted(seqs, key=lambda s: len(s.ids), reverse=True)
    out: list[list[TeacherSequence]] = []
    for s in order:
        # Sorted descending: the batch's first row sets its padded width.
        if out and len(out[-1][0].ids) * (len(out[-1]) + 1) <= batch_tokens:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _side_arrays(sig: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
    """Store fields of one side from the signals at its T+1 states (token stats: first T)."""
    out = {f"{side}_values": sig["values"].copy()}
    if "token_logps" in sig:
        out[f"{side}_token_logps"] = sig["token_logps"][:-1].copy()
        out[f"{side}_token_logits"] = sig["token_logits"][:-1].copy()
    if "topk_logits" in sig:
        out[f"{side}_topk_logits"] = sig["topk_logits"].copy()
        out[f"{side}_topk_ids"] = sig["topk_ids"].astype(np.int32)
    return out


def sequences(slot: int, tp: TokenizedPair) -> list[TeacherSequence]:
    return [
        TeacherSequence(slot, side, tp.prompt_ids + getattr(tp, f"{side}_ids"), len(tp.prompt_ids))
        for side in SIDES
    ]


def compute_pair_signals(
    model: Any, tokenizer: Any, pair: PreferencePair, config: PrecomputeConfig, reference: Any = None
) -> tuple[TokenizedPair, PairValues]:
    """The teacher's signals for one pair (inspector, evaluation samples). RowError if unusable.
    `reference`: the teacher's reference model, for `q_source="implicit"`."""
    tp = tokenize_pair(tokenizer, pair, max_length=config.max_length, truncation_mode=config.truncation_mode)
    ids = tp.prompt_ids + tp.chosen_ids
    with eval_mode(model), eval_mode(reference):
        verify_once(model, ids)
        if reference is not None:
            verify_once(reference, ids)
        seqs = sequences(0, tp)
        sides = run_batch(model, seqs, config, pad_token_id(tokenizer), model_device(model), reference)
    return tp, PairValues(**sides[0], **sides[1])


class eval_mode:
    """model.eval() for the duration (a teacher with dropout on would give random values)."""

    def __init__(self, model: Any) -> None:  # None: nothing to do
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        if self.model is not None:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.model is not None:
            self.model.train(self.was_training)
