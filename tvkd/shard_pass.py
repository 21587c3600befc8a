"""The teacher pass over some shards of a value store: tokenize a shard, run the teacher over
it, check the numbers, write it (`tvkd.precompute` is the public entry point).

Each shard is computed under its shard lock (`tvkd.store_lock`), so any number of processes
may be given overlapping shard lists: a shard already written, or written by another process
while this one waited for its lock, is skipped, and a shard another process is computing is
passed by first (work is shared, not duplicated). Inside a shard the pairs' two sequences are
sorted by length and packed into batches of at most `batch_tokens` padded tokens; the batches
depend on the shard alone, so a shard's numbers are the same whichever process computes it.
The teacher is loaded at the first shard that needs it (`LazyTeacher`): a process whose shards
are all on disk never loads it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvkd.config import PrecomputeConfig
from tvkd.data import DataError, DataReport, PreferencePair, RowError, RowIssue
from tvkd.modeling import model_device, pad_token_id
from tvkd.numerics import NonFiniteError, first_nonfinite
from tvkd.store import PairValues, StoreWriter, store_arrays
from tvkd.store_lock import shard_lock_name, try_hold
from tvkd.teacher import batches_by_tokens, eval_mode, run_batch, sequences, verify_once
from tvkd.tokenize import TokenizedPair, tokenize_pair


class PrecomputeStopped(Exception):
    """should_stop() returned True. Finished shards are kept; calling again resumes."""


def report(source: str, total: int, issues: list[RowIssue]) -> DataReport:
    return DataReport(source, total, kept=total - len(issues), dropped=len(issues), issues=issues)


def tokenize_rows(
    tokenizer: Any, pairs: Sequence[PreferencePair], indices: range, config: PrecomputeConfig
) -> tuple[list[TokenizedPair | None], list[RowIssue]]:
    out: list[TokenizedPair | None] = []
    issues: list[RowIssue] = []
    for i in indices:
        try:
            out.append(
                tokenize_pair(
                    tokenizer,
                    pairs[i],
                    max_length=config.max_length,
                    index=i,
                    truncation_mode=config.truncation_mode,
                )
            )
        except RowError as exc:
            out.append(None)
            issues.append(exc.issue)
    return out, issues


def check_all_rows(
    tokenizer: Any, pairs: Sequence[PreferencePair], source: str, config: PrecomputeConfig
) -> None:
    """on_error="raise": find every bad row before any teacher work (ids are not kept)."""
    _, issues = tokenize_rows(tokenizer, pairs, range(len(pairs)), config)
    if issues:
        raise DataError(report(source, len(pairs), issues))


@dataclass
class Run:
    """Counters of one precompute call."""

    total: int
    done: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0


class LazyTeacher:
    """The teacher (and, with q_source="implicit", its reference) in eval mode, loaded on the first
    `get()`, which also runs the head check on the first usable pair. Use as a context manager."""

    def __init__(
        self,
        teacher: str | Path,
        tokenizer: Any,
        pairs: Sequence[PreferencePair],
        config: PrecomputeConfig,
        *,
        device: str | torch.device,
        model: Any = None,
        teacher_reference: str | Path | None = None,
        reference_model: Any = None,
    ) -> None:
        self.teacher, self.tokenizer, self.pairs, self.config = str(teacher), tokenizer, pairs, config
        self.device, self.model, self.reference_model = device, model, reference_model
        self.teacher_reference = teacher_reference
        self._ready: tuple[Any, Any] | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> LazyTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def device_name(self) -> str:
        return str(model_device(self._ready[0]) if self._ready else self.device)

    def get(self) -> tuple[Any, Any]:
        """(teacher model, reference model or None)."""
        if self._ready is not None:
            return self._ready
        from tvkd.models import load_causal_lm

        model = self.model
        if model is None:
            model = load_causal_lm(self.teacher, dtype=torch.float32, device=self.device)
        reference = None
        if self.config.q_source == "implicit":
            reference = self.reference_model
            if reference is None:
                assert self.teacher_reference is not None  # checked by precompute_key
                reference = load_causal_lm(
                    self.teacher_reference, dtype=torch.float32, device=model_device(model)
                )
        self._stack.enter_context(eval_mode(model))
        self._stack.enter_context(eval_mode(reference))
        verify_first(self.teacher, model, self.tokenizer, self.pairs, self.config)
        if reference is not None:
            verify_first(f"{self.teacher}'s reference", reference, self.tokenizer, self.pairs, self.config)
        self._ready = (model, reference)
        return self._ready


def fill_shards(
    writer: StoreWriter,
    shards: Iterable[int],
    teacher: LazyTeacher,
    pairs: Sequence[PreferencePair],
    run: Run,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    made_by: Mapping[str, Any] | None = None,
    wait_for_busy: bool = True,
) -> list[int]:
    """Compute and write every shard of `shards` (in that order) not yet on disk; returns the
    shards this call computed.

    A first pass takes each shard whose lock is free (another process computing one is passed
    by); with `wait_for_busy` a second pass waits for each passed shard's lock and computes it
    unless its holder wrote it (a holder that died left it unwritten). Without it, the shards
    other processes hold are left to them. Raises StoreLockTimeout(stopped=True) or
    PrecomputeStopped when should_stop(); NonFiniteError before writing a shard with a NaN/Inf."""
    todo = list(dict.fromkeys(shards))
    done = writer.done_shards(todo)
    run.done = sum(len(writer.shard_range(i)) for i in done)
    if progress is not None:
        progress(run.done, run.total)
    computed: list[int] = []
    busy: list[int] = []
    for i in todo:
        if i in done:
            continue
        with try_hold(writer.path / shard_lock_name(i)) as got:
            if got:
                _fill_one(writer, i, teacher, pairs, run, progress, should_stop, made_by, computed)
            else:
                busy.append(i)
    for i in busy if wait_for_busy else ():
        with writer.acquire_shard(i, should_stop=should_stop):
            _fill_one(writer, i, teacher, pairs, run, progress, should_stop, made_by, computed)
    return computed


def _fill_one(
    writer: StoreWriter,
    i: int,
    teacher: LazyTeacher,
    pairs: Sequence[PreferencePair],
    run: Run,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    made_by: Mapping[str, Any] | None,
    computed: list[int],
) -> None:
    """Shard `i`, its lock held: skipped when another process wrote it meanwhile, else computed."""
    if writer.done_shards([i]):
        run.done += len(writer.shard_range(i))
        if progress is not None:
            progress(run.done, run.total)
        return
    model, reference = teacher.get()
    config, t0, tokens0 = teacher.config, time.perf_counter(), run.tokens
    tokenized, issues = tokenize_rows(teacher.tokenizer, pairs, writer.shard_range(i), config)
    pad_id = pad_token_id(teacher.tokenizer)
    records = compute_shard(model, tokenized, config, pad_id, run, progress, should_stop, reference)
    check_finite(teacher.teacher, pairs, writer.shard_range(i), records)  # before anything is written
    info = {"issues": [vars(issue) for issue in issues], "teacher_tokens": run.tokens - tokens0}
    seconds = round(time.perf_counter() - t0, 3)
    writer.write_shard(i, records, info=info, made_by={**dict(made_by or {}), "seconds": seconds})
    computed.append(i)


def compute_shard(
    model: Any,
    tokenized: list[TokenizedPair | None],
    config: PrecomputeConfig,
    pad_id: int,
    run: Run,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    reference: Any = None,
) -> list[PairValues | None]:
    seqs = [s for slot, tp in enumerate(tokenized) if tp is not None for s in sequences(slot, tp)]
    arrays: list[dict[str, Any]] = [{} for _ in tokenized]
    n_fields = len(store_arrays(config.topk, config.token_stats))  # both sides' fields
    run.done += sum(tp is None for tp in tokenized)  # missing pairs are done at once
    if not seqs and progress is not None:  # a shard of missing pairs only: no batch reports it
        progress(run.done, run.total)
    device = model_device(model)
    for batch in batches_by_tokens(seqs, config.batch_tokens):
        if should_stop is not None and should_stop():
            raise PrecomputeStopped("precompute stopped on request; finished shards are kept")
        t0 = time.perf_counter()
        signals = run_batch(model, batch, config, pad_id, device, reference)
        for s, side_arrays in zip(batch, signals, strict=True):
            arrays[s.slot].update(side_arrays)
            if len(arrays[s.slot]) == n_fields:  # the pair's second side just finished
                run.done += 1
        run.forward_seconds += time.perf_counter() - t0
        run.tokens += sum(len(s.ids) for s in batch)
        if progress is not None:
            progress(run.done, run.total)
    return [None if tp is None else PairValues(**a) for tp, a in zip(tokenized, arrays, strict=True)]


def check_finite(
    teacher: str, pairs: Sequence[PreferencePair], indices: range, records: Sequence[PairValues | None]
) -> None:
    """NonFiniteError (code nonfinite_teacher) naming the teacher and the first pair of `records`
    whose signals hold a NaN or an infinity."""
    for i, record in zip(indices, records, strict=True):
        bad = None if record is None else first_nonfinite(vars(record))
        if bad is not None:
            raise NonFiniteError(
                "nonfinite_teacher",
                f"teacher {teacher} gives non-finite {bad} (NaN/Inf) for pair {i} (row {pairs[i].row}); "
                "nothing of it was written to the value store. Its weights may be damaged, or its "
                "logits overflow (try without bf16)",
            )


def verify_first(
    teacher: str, model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], config: PrecomputeConfig
) -> None:
    """verify_head on the first usable pair (nothing to check when no pair is usable); non-finite
    logits name the teacher and the pair."""
    for i in range(min(len(pairs), 64)):
        try:
            tp = tokenize_pair(
                tokenizer, pairs[i], max_length=config.max_length, truncation_mode=config.truncation_mode
            )
        except RowError:
            continue
        try:
            verify_once(model, tp.prompt_ids + tp.chosen_ids)
        except NonFiniteError as exc:
            raise NonFiniteError(
                exc.code, f"teacher {teacher}: pair {i} (row {pairs[i].row}): {exc}; nothing was computed"
            ) from exc
        return
