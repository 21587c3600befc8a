"""From preference pairs to the tensors of one student forward.

A pair of the job becomes a `TrainPair` (`build_train_pairs`): the student's token ids of prompt
and both responses, the teacher's values V(s_1 .. s_{T+1}) on the student's token boundaries
(as stored for a shared tokenizer, mapped with `map_boundary_values` otherwise; MATH.md,
"different tokenizers"), the teacher's per-token statistics when stored, and (filled by the
reference pass) log π_ref. B of them are `collate`d into one `Batch` of 2B rows (chosen, then
rejected), and `policy_logps` gives log π_θ of every response token from one decoder pass.

The order a pair takes: `PreferencePair` → `TokenizedPair` → `TrainPair` → `Batch` → the
per-pair terms of `tvkd.losses`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tvkd.data import PreferencePair, RowError
from tvkd.logps import linear_logps, logits_logps, response_positions
from tvkd.modeling import decoder_hidden, output_head
from tvkd.numerics import NonFiniteError, first_nonfinite
from tvkd.store import ValueStore
from tvkd.tokenize import end_token_ids, tokenize_pair
from tvkd.values import map_boundary_values


@dataclass
class TrainPair:
    """One kept pair, ready to batch: student token ids and the teacher's signals on them."""

    index: int  # position in `pairs` (and in the value store)
    row: int  # source row, for messages to the user
    prompt_ids: np.ndarray  # int64 [P]
    chosen_ids: np.ndarray  # int64 [Tc], EOS/end-of-turn included
    rejected_ids: np.ndarray
    chosen_values: np.ndarray  # float32 [Tc+1]: V(s_1 .. s_{Tc+1}) at the student's boundaries
    rejected_values: np.ndarray
    # tvkd_loss keyword → float32 [T]: the teacher's log-prob/logit of each token (shared tokenizer
    # and a store with token stats only); the 'logprob'/'logit' modes and the samples use them.
    teacher: dict[str, np.ndarray] = field(default_factory=dict)
    ref_chosen: np.ndarray | None = None  # float32 [Tc]: log π_ref, filled by the reference pass
    ref_rejected: np.ndarray | None = None
    # Does each response end with its end-of-response token (not cut by truncation)? For
    # terminal="pre_eos" (MATH.md), which ends at V(s_T) only where the teacher chose to end.
    chosen_ended: bool = True
    rejected_ended: bool = True

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def build_train_pairs(
    pairs: Sequence[PreferencePair],
    indices: Sequence[int],
    *,
    tokenizer: Any,
    max_length: int,
    store: ValueStore | None = None,
    teacher_tokenizer: Any = None,
    same_tokenizer: bool = True,
    truncation_mode: str = "none",
) -> tuple[list[TrainPair], list[dict[str, Any]]]:
    """TrainPairs of `pairs[i]` for i in `indices` (sorted), and the pairs dropped with the reason.

    Without a store the values are zeros (ψ ≡ 0). With one, a shared tokenizer uses the stored
    values as they are; another tokenizer maps them onto the student's boundaries (MATH.md,
    "different tokenizers"), which needs the teacher's tokenization of the pair again (with the
    store's max_length and truncation_mode). `max_length` is the effective one
    (`tvkd.windows.effective_max_length`); longer rows follow `truncation_mode`.
    """
    out: list[TrainPair] = []
    dropped: list[dict[str, Any]] = []
    teacher_max = int(store.fields["max_length"]) if store is not None else 0
    teacher_cut = str(store.fields.get("truncation_mode", "none")) if store is not None else "none"
    ends = end_token_ids(tokenizer)
    for i in sorted(set(indices)):
        pair = pairs[i]
        try:
            tp = tokenize_pair(
                tokenizer, pair, max_length=max_length, index=i, truncation_mode=truncation_mode
            )
        except RowError as exc:
            dropped.append({"index": i, "row": pair.row, "code": exc.issue.code, "message": str(exc.issue)})
            continue
        sides = {"chosen": tp.chosen_ids, "rejected": tp.rejected_ids}
        teacher: dict[str, np.ndarray] = {}
        if store is None:
            values = {s: np.zeros(len(ids) + 1, np.float32) for s, ids in sides.items()}
        elif i not in store:
            dropped.append(
                {
                    "index": i,
                    "row": pair.row,
                    "code": "teacher_missing",
                    "message": f"row {pair.row}: not in the value store (the teacher could not take it)",
                }
            )
            continue
        elif same_tokenizer:
            pv = store.pair(i)
            values = {s: np.asarray(getattr(pv, f"{s}_values"), np.float32) for s in sides}
            for s, ids in sides.items():
                if len(values[s]) != len(ids) + 1:
                    raise ValueError(
                        f"pair {i} (row {pair.row}): the value store {store.path} has {len(values[s])} "
                        f"{s} values but the student has {len(ids)} {s} tokens (+1 expected) with the "
                        "same tokenizer: the store was computed from another tokenization of these "
                        "pairs; precompute again"
                    )
                for stat in ("logps", "logits"):
                    arr = getattr(pv, f"{s}_token_{stat}")
                    if arr is not None:
                        teacher[f"{s}_teacher_{stat}"] = np.asarray(arr, np.float32)
        else:
            pv = store.pair(i)
            try:
                tt = tokenize_pair(
                    teacher_tokenizer, pair, max_length=teacher_max, index=i, truncation_mode=teacher_cut
                )
            except RowError as exc:  # the store holds it, so this is a different teacher tokenizer
                raise ValueError(f"pair {i}: the teacher tokenizer rejects a stored pair: {exc}") from exc
            values = {
                s: map_boundary_values(  # a copy: store rows are read-only memory-mapped views
                    np.array(getattr(pv, f"{s}_values")), getattr(tt, f"{s}_ends"), getattr(tp, f"{s}_ends")
                ).numpy()
                for s in sides
            }
        bad = first_nonfinite({**values, **teacher})
        if bad is not None:
            raise NonFiniteError(
                "nonfinite_store",
                f"pair {i} (row {pair.row}): the value store {getattr(store, 'path', '')} holds non-finite "
                f"{bad.removeprefix('chosen_teacher_').removeprefix('rejected_teacher_')} (NaN/Inf) "
                f"({bad.split('_')[0]} side); delete it and precompute again",
            )
        out.append(
            TrainPair(
                index=i,
                row=pair.row,
                prompt_ids=np.asarray(tp.prompt_ids, np.int64),
                chosen_ids=np.asarray(tp.chosen_ids, np.int64),
                rejected_ids=np.asarray(tp.rejected_ids, np.int64),
                chosen_values=values["chosen"],
                rejected_values=values["rejected"],
                teacher=teacher,
                chosen_ended=tp.chosen_ids[-1] in ends,
                rejected_ended=tp.rejected_ids[-1] in ends,
            )
        )
    return out, dropped


def dropped_message(dropped: Sequence[dict[str, Any]], shown: int = 20) -> str:
    """'dropped N pairs (rows a, b, ... and M more)' for `build_train_pairs`' dropped list."""
    rows = ", ".join(str(d["row"]) for d in dropped[:shown])
    more = f" and {len(dropped) - shown} more" if len(dropped) > shown else ""
    return f"dropped {len(dropped)} pairs (rows {rows}{more})"


def _pad(rows: Sequence[np.ndarray], width: int, dtype: Any = np.float32) -> Tensor:
    out = np.zeros((len(rows), width), dtype=dtype)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return torch.from_numpy(out)


@dataclass
class Batch:
    """B pairs as one [2B, ·] batch: chosen rows 0..B−1, then rejected rows B..2B−1, right-padded."""

    pairs: list[TrainPair]
    input_ids: Tensor  # [2B, L] prompt ⊕ response ⊕ padding
    attention_mask: Tensor  # [2B, L]
    prompt_lengths: Tensor  # [2B]
    response_lengths: Tensor  # [2B]
    labels: Tensor  # [N] every row's response tokens back to back, N = Σ response lengths
    response_mask: Tensor  # [2B, T] bool, True on the row's response tokens
    values: Tensor  # [2B, T+1] teacher potentials V(s_1 .. s_{T_b+1}), zero-padded
    ref_logps: Tensor  # [2B, T] log π_ref, zero-padded
    # tvkd_loss keyword → tensor: token stats [B, T] when present; `*_ended` [B] bool when some
    # response of the batch does not end with its end token (absent: all do).
    teacher: dict[str, Tensor]
    tokens: int  # real (unpadded) tokens in the batch

    @property
    def size(self) -> int:
        return len(self.pairs)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[2B, ...] → ([B, ...] chosen, [B, ...] rejected)."""
        return x[: self.size], x[self.size :]


def collate(pairs: Sequence[TrainPair], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """B pairs → one right-padded [2B, L] batch on `device` (see `Batch`); `pad_id` fills the
    padding (masked, never read)."""
    rows = [np.concatenate([p.prompt_ids, p.chosen_ids]) for p in pairs]
    rows += [np.concatenate([p.prompt_ids, p.rejected_ids]) for p in pairs]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    width = max(len(r) for r in responses)
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.from_numpy(row)
        attention_mask[r, : len(row)] = 1
    response_lengths = torch.tensor([len(r) for r in responses])
    ref = [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs]
    # "chosen_teacher_logps" etc.: one side each, [B, T] like the log-probs of that side.
    teacher = {key: _pad([p.teacher[key] for p in pairs], width).to(device) for key in pairs[0].teacher}
    for side in ("chosen", "rejected"):
        ended = [getattr(p, f"{side}_ended") for p in pairs]
        if not all(ended):
            teacher[f"{side}_ended"] = torch.tensor(ended, device=device)
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs] * 2),
        "response_lengths": response_lengths,
        "labels": torch.from_numpy(np.concatenate(responses)),
        "response_mask": torch.arange(width)[None, :] < response_lengths[:, None],
        "values": _pad([p.chosen_values for p in pairs] + [p.rejected_values for p in pairs], width + 1),
        "ref_logps": _pad([np.zeros(0) if r is None else r for r in ref], width),
    }
    return Batch(
        pairs=list(pairs),
        teacher=teacher,
        tokens=sum(p.tokens for p in pairs),
        **{k: v.to(device) for k, v in tensors.items()},
    )


# --------------------------------------------------------------------------------------------
# The data order


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that see each of `n` training pairs once (the last one may be short)."""
    return math.ceil(n / (batch_size * grad_accum))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n, generator=gen).tolist())


def step_order(n: int, step: int, seed: int, batch_size: int, grad_accum: int) -> list[list[int]]:
    """Indices into the `n` training pairs of each micro-batch of optimizer step `step`.

    Each epoch is a permutation drawn from (seed, epoch), so the order is a function of
    (seed, step) only: a resumed run sees exactly the batches of the uninterrupted one.
    """
    per_step = batch_size * grad_accum
    epoch, position = divmod(step, steps_per_epoch(n, batch_size, grad_accum))
    chosen = _epoch_order(n, seed, epoch)[position * per_step : (position + 1) * per_step]
    return [list(chosen[k : k + batch_size]) for k in range(0, len(chosen), batch_size)]


# --------------------------------------------------------------------------------------------
# The forward


def packed_layout(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's rows back to back in one row, without padding.

    Returns input_ids [1, S] and position_ids [1, S] (restarting at 0 at each row; S = the
    batch's real tokens) and the N packed positions whose next-token logits predict a response
    token, row-major like `batch.labels`.
    """
    mask = batch.attention_mask.bool()
    lengths = mask.sum(1)
    width = mask.shape[1]
    columns = torch.arange(width, device=mask.device)[None].expand_as(mask)
    starts = torch.cumsum(lengths, 0) - lengths  # where each row begins in the packed row
    packed_index = starts[:, None] + columns  # packed position of each real (row, column)
    wanted = response_positions(batch.attention_mask, batch.prompt_lengths, batch.response_lengths)
    return batch.input_ids[mask][None], columns[mask][None], packed_index[wanted]


def policy_logps(
    model: Any, batch: Batch, *, packed: bool = False, fused_head: bool = True, decoder: Any = None
) -> tuple[Tensor, Tensor]:
    """log π(y_t | s_t) of every response token: ([B, T] chosen, [B, T] rejected), float32, 0 off mask.

    Only the decoder runs over the [2B, L] batch; the LM head and log-softmax run on the N
    response-predicting positions alone, a chunk at a time (`linear_logps`), so [2B, L, vocab]
    logits never exist. hidden[positions] and `labels` are both row-major, so they line up.

    Speed options, each giving the same log-probs (tests/test_speed_levers.py):
    `packed` runs the decoder on the rows back to back in one row without padding
    (`packed_layout`); `fused_head=False` is the plain path instead of `linear_logps`: full
    logits of the response positions, float32 log-softmax, gather; `decoder` replaces the model's
    decoder module in the forward (e.g. `torch.compile(decoder)`, which shares its weights).
    """
    core_decoder, weight, bias = output_head(model)
    decoder = core_decoder if decoder is None else decoder
    if packed:
        input_ids, position_ids, positions = packed_layout(batch)
        hidden = decoder_hidden(decoder, input_ids, None, position_ids)[0][positions]
    else:
        hidden = decoder_hidden(decoder, batch.input_ids, batch.attention_mask)
        hidden = hidden[
            response_positions(batch.attention_mask, batch.prompt_lengths, batch.response_lengths)
        ]
    if fused_head:
        flat = linear_logps(hidden, weight, batch.labels, bias)
    else:
        flat = logits_logps(torch.nn.functional.linear(hidden, weight, bias), batch.labels)
    logps = flat.new_zeros(batch.response_mask.shape).masked_scatter(batch.response_mask, flat)
    return batch.split(logps)
