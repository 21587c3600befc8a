"""The teacher pass: V_φ at every response state of every pair, into a content-addressed store.

For a response of T tokens after a prompt of P tokens (teacher tokenization), the teacher's
next-token logits at positions P−1 … P+T−1 are its logits at the states s_1 … s_{T+1}; V there
gives the T+1 values of MATH.md, and the first T positions (label = the response token) give
the optional token log-prob/logit. Only the decoder runs over the batch; the LM head is applied
by `tvkd.values.teacher_signals` to the response rows alone, a chunk at a time, so full
[tokens × vocab] logits never exist.

Work is cut into shards of `shard_size` pairs. A shard is tokenized when it is reached, its two
sequences per pair are sorted by length and packed into batches of at most `batch_tokens` padded
tokens, and it is written as soon as it is done; only that shard's results are ever held, and a
stopped or killed run resumes at the first unwritten shard. The store key is computed before the
teacher is loaded, so a cache hit costs a tokenizer load and the fingerprints.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from tvkd.config import PrecomputeConfig
from tvkd.data import DataError, DataReport, PreferencePair, RowError, RowIssue, dataset_fingerprint
from tvkd.modeling import decoder_hidden, head_problem, model_device, output_head, pad_token_id, softcap_of
from tvkd.store import (
    SIDES,
    PairValues,
    StoreLockTimeout,
    StoreWriter,
    ValueStore,
    content_key,
    key_fields,
    store_arrays,
)
from tvkd.tokenize import TokenizedPair, check_chat_template, tokenize_pair
from tvkd.values import TeacherSignals, teacher_signals

# Relative tolerance of the one-off check that our head reproduces the model's own logits.
_HEAD_CHECK_RTOL = 1e-3
_HEAD_CHECK_TOKENS = 16


class PrecomputeStopped(Exception):
    """should_stop() returned True. Finished shards are kept; calling again resumes."""


class UnsupportedTeacher(ValueError):
    """The teacher's output head is not one the hidden-state path reproduces exactly."""


@dataclass
class PrecomputeResult:
    store: ValueStore
    key: str
    cached: bool  # True when no teacher forward ran in this call (found, or computed by another process)
    report: DataReport
    pairs: int
    tokens: int  # teacher tokens (prompt + response, both sides) run through the teacher this call
    seconds: float
    tokens_per_second: float
    waited: float = 0.0  # seconds spent waiting for another process computing the same key


@dataclass
class _Sequence:
    """One side of one pair, laid out prompt ⊕ response."""

    slot: int  # position of the pair within its shard
    side: str
    ids: list[int]
    prompt_len: int


# --------------------------------------------------------------------------------------------
# The teacher forward


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
    one forward of a few tokens, in float32 with autocast off.
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
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    if err > _HEAD_CHECK_RTOL * scale:
        raise UnsupportedTeacher(
            f"{type(model).__name__}: decoder hidden states × output head differ from the model's "
            f"logits (max abs error {err:.3g} at logit scale {scale:.3g}); its head is not supported"
        )
    _VERIFIED.add(model)


def _verify_once(model: Any, ids: Sequence[int]) -> None:
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
    if config.token_stats:
        nxt = (cols + 1).clamp(max=input_ids.shape[1] - 1)
        labels = torch.where(offsets == counts[rows] - 1, -100, input_ids[rows, nxt])
    # Outside autocast: the head runs in float32 whatever precision the decoder ran in.
    return teacher_signals(
        hidden[rows, cols],
        w,
        b,
        labels=labels,
        q_source=config.q_source,
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


def _pad_batch(seqs: Sequence[_Sequence], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        mask[r, : len(s.ids)] = 1
    return ids.to(device), mask.to(device)


def _run_batch(
    model: Any, seqs: Sequence[_Sequence], config: PrecomputeConfig, pad_id: int, device: torch.device
) -> list[dict[str, np.ndarray]]:
    """Store arrays of each sequence of the batch (keys `<side>_values`, ...)."""
    ids, mask = _pad_batch(seqs, pad_id, device)
    # V(s_1) is at the last prompt position; T+1 states in all.
    spans = [(s.prompt_len - 1, len(s.ids) - s.prompt_len + 1) for s in seqs]
    flat = _forward_flat(model, ids, mask, spans, config)
    # One device→host copy per field for the whole batch; rows are then copied out of it so that
    # a stored row owns its memory (a view would pin the whole batch until its shard is written).
    host = {name: t.cpu().numpy() for name, t in vars(flat).items() if t is not None}
    bounds = np.cumsum([0] + [n for _, n in spans])
    return [
        _side_arrays({name: a[bounds[r] : bounds[r + 1]] for name, a in host.items()}, s.side)
        for r, s in enumerate(seqs)
    ]


def _batches(seqs: list[_Sequence], batch_tokens: int) -> list[list[_Sequence]]:
    """Longest first (an out-of-memory shows at once), each batch ≤ batch_tokens padded tokens."""
    order = sorted(seqs, key=lambda s: len(s.ids), reverse=True)
    out: list[list[_Sequence]] = []
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


def _sequences(slot: int, tp: TokenizedPair) -> list[_Sequence]:
    return [
        _Sequence(slot, side, tp.prompt_ids + getattr(tp, f"{side}_ids"), len(tp.prompt_ids))
        for side in SIDES
    ]


def compute_pair_signals(
    model: Any, tokenizer: Any, pair: PreferencePair, config: PrecomputeConfig
) -> tuple[TokenizedPair, PairValues]:
    """The teacher's signals for one pair (inspector, evaluation samples). RowError if unusable."""
    tp = tokenize_pair(tokenizer, pair, max_length=config.max_length)
    with _eval_mode(model):
        _verify_once(model, tp.prompt_ids + tp.chosen_ids)
        sides = _run_batch(model, _sequences(0, tp), config, pad_token_id(tokenizer), model_device(model))
    return tp, PairValues(**sides[0], **sides[1])


class _eval_mode:
    """model.eval() for the duration (a teacher with dropout on would give random values)."""

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# --------------------------------------------------------------------------------------------
# The dataset pass


def _report(source: str, total: int, issues: list[RowIssue]) -> DataReport:
    return DataReport(source, total, kept=total - len(issues), dropped=len(issues), issues=issues)


def _report_from_store(source: str, store: ValueStore) -> DataReport:
    issues = [RowIssue(**d) for d in store.manifest.get("issues", [])]
    return _report(source, store.num_pairs, issues)


def _tokenize_shard(
    tokenizer: Any, pairs: Sequence[PreferencePair], indices: range, max_length: int
) -> tuple[list[TokenizedPair | None], list[RowIssue]]:
    out: list[TokenizedPair | None] = []
    issues: list[RowIssue] = []
    for i in indices:
        try:
            out.append(tokenize_pair(tokenizer, pairs[i], max_length=max_length, index=i))
        except RowError as exc:
            out.append(None)
            issues.append(exc.issue)
    return out, issues


def _check_all_rows(tokenizer: Any, pairs: Sequence[PreferencePair], source: str, max_length: int) -> None:
    """on_error="raise": find every bad row before any teacher work (ids are not kept)."""
    _, issues = _tokenize_shard(tokenizer, pairs, range(len(pairs)), max_length)
    if issues:
        raise DataError(_report(source, len(pairs), issues))


@dataclass
class _Run:
    """Counters of one precompute call."""

    total: int
    done: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0


def _compute_shard(
    model: Any,
    tokenized: list[TokenizedPair | None],
    config: PrecomputeConfig,
    pad_id: int,
    run: _Run,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> list[PairValues | None]:
    seqs = [s for slot, tp in enumerate(tokenized) if tp is not None for s in _sequences(slot, tp)]
    arrays: list[dict[str, Any]] = [{} for _ in tokenized]
    n_fields = len(store_arrays(config.topk, config.token_stats))  # both sides' fields
    run.done += sum(tp is None for tp in tokenized)  # missing pairs are done at once
    if not seqs and progress is not None:  # a shard of missing pairs only: no batch reports it
        progress(run.done, run.total)
    device = model_device(model)
    for batch in _batches(seqs, config.batch_tokens):
        if should_stop is not None and should_stop():
            raise PrecomputeStopped("precompute stopped on request; finished shards are kept")
        t0 = time.perf_counter()
        for s, side_arrays in zip(batch, _run_batch(model, batch, config, pad_id, device), strict=True):
            arrays[s.slot].update(side_arrays)
            if len(arrays[s.slot]) == n_fields:  # the pair's second side just finished
                run.done += 1
        run.forward_seconds += time.perf_counter() - t0
        run.tokens += sum(len(s.ids) for s in batch)
        if progress is not None:
            progress(run.done, run.total)
    return [None if tp is None else PairValues(**a) for tp, a in zip(tokenized, arrays, strict=True)]


def _fill_store(
    writer: StoreWriter,
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    config: PrecomputeConfig,
    run: _Run,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> None:
    done = writer.done_shards()
    run.done = sum(len(writer.shard_range(i)) for i in done)
    if progress is not None:
        progress(run.done, run.total)
    pad_id = pad_token_id(tokenizer)
    for i in range(writer.num_shards):
        if i in done:
            continue
        t0, tokens0 = time.perf_counter(), run.tokens
        tokenized, issues = _tokenize_shard(tokenizer, pairs, writer.shard_range(i), config.max_length)
        records = _compute_shard(model, tokenized, config, pad_id, run, progress, should_stop)
        info = {
            "issues": [vars(issue) for issue in issues],
            "teacher_tokens": run.tokens - tokens0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        writer.write_shard(i, records, info=info)


def precompute_key(
    teacher: str | Path,
    pairs: Sequence[PreferencePair],
    config: PrecomputeConfig,
    *,
    tokenizer: Any = None,
) -> tuple[str, dict[str, Any]]:
    """(store key, key fields) of a precompute request, without loading the teacher's weights
    (they are hashed, with a per-file cache). Lets a caller ask whether it is cached."""
    from tvkd.models import load_tokenizer, model_fingerprint, tokenizer_fingerprint

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(teacher))
    fields = key_fields(
        teacher=str(teacher),
        teacher_fingerprint=model_fingerprint(str(teacher)),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        dataset_fingerprint=dataset_fingerprint(pairs),
        config=config,
    )
    return content_key(fields), fields


def precompute_values(
    teacher: str | Path,
    pairs: Sequence[PreferencePair],
    config: PrecomputeConfig,
    *,
    store_root: str | Path,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_error: Literal["raise", "drop"] = "drop",
    model: Any = None,
    tokenizer: Any = None,
) -> PrecomputeResult:
    """Teacher values for `pairs` under `store_root`, computed once per content key.

    Pair i of the store is pairs[i]. Rows the teacher cannot take (too long) are `missing` with
    on_error="drop"; with "raise" a DataError lists every such row before any teacher work.
    `model`/`tokenizer` skip loading them from `teacher` (which still names and fingerprints the
    teacher, so pass the matching path); a given model stays on its own device.
    """
    from tvkd.models import load_causal_lm, load_tokenizer

    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop'; got {on_error!r}")
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(teacher))
    key, fields = precompute_key(teacher, pairs, config, tokenizer=tokenizer)
    source = f"precompute({teacher}, max_length={config.max_length})"

    def result(store: ValueStore, run: _Run | None, waited: float = 0.0) -> PrecomputeResult:
        report = _report_from_store(source, store)
        if on_error == "raise" and report.issues:
            raise DataError(report)
        secs = time.perf_counter() - start
        tokens = run.tokens if run else 0
        tps = tokens / run.forward_seconds if run and run.forward_seconds > 0 else 0.0
        return PrecomputeResult(store, key, run is None, report, len(pairs), tokens, secs, tps, waited)

    found = ValueStore.find(store_root, key)
    if found is not None:
        return result(found, None)
    check_chat_template(tokenizer, pairs, source)
    if on_error == "raise":
        _check_all_rows(tokenizer, pairs, source, config.max_length)
    writer = StoreWriter(
        store_root,
        key,
        fields=fields,
        num_pairs=len(pairs),
        shard_size=config.shard_size,
        arrays=store_arrays(config.topk, config.token_stats),
        topk=config.topk,
    )
    try:
        with writer.acquire(should_stop=should_stop) as waited:
            found = writer.find_complete()  # another process may have finished it while we waited
            if found is not None:
                return result(found, None, waited)
            if model is None:
                model = load_causal_lm(teacher, dtype=torch.float32, device=device)
            run = _Run(total=len(pairs))
            with _eval_mode(model):
                _verify_first(model, tokenizer, pairs, config)
                _fill_store(writer, model, tokenizer, pairs, config, run, progress, should_stop)
            store = writer.finalize(
                timings={
                    "seconds": round(time.perf_counter() - start, 3),
                    "forward_seconds": round(run.forward_seconds, 3),
                    "teacher_tokens_this_run": run.tokens,
                    "device": str(model_device(model)),
                }
            )
            return result(store, run, waited)
    except StoreLockTimeout as exc:
        if exc.stopped:
            raise PrecomputeStopped(str(exc)) from exc
        raise


def _verify_first(
    model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], config: PrecomputeConfig
) -> None:
    """verify_head on the first usable pair (nothing to check when no pair is usable)."""
    for i in range(min(len(pairs), 64)):
        try:
            tp = tokenize_pair(tokenizer, pairs[i], max_length=config.max_length)
        except RowError:
            continue
        _verify_once(model, tp.prompt_ids + tp.chosen_ids)
        return
