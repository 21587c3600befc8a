"""The teacher pass over a dataset: V_φ at every response state of every pair, into a
content-addressed value store (`tvkd.store`), computed once per key.

The forward itself is `tvkd.teacher`. Work is cut into shards of `shard_size` pairs. A shard is
tokenized when it is reached, its two sequences per pair are sorted by length and packed into
batches of at most `batch_tokens` padded tokens, and it is written as soon as it is done; only
that shard's results are ever held, and a stopped or killed run resumes at the first unwritten
shard. The store key is computed before the teacher is loaded, so a cache hit costs a tokenizer
load and the fingerprints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tvkd.config import ConfigError, PrecomputeConfig
from tvkd.data import DataError, DataReport, PreferencePair, RowError, RowIssue, dataset_fingerprint
from tvkd.modeling import model_device, pad_token_id
from tvkd.numerics import NonFiniteError, first_nonfinite
from tvkd.store import (
    PairValues,
    StoreLockTimeout,
    StoreWriter,
    ValueStore,
    content_key,
    key_fields,
    store_arrays,
)
from tvkd.teacher import (
    batches_by_tokens,
    eval_mode,
    run_batch,
    sequences,
    verify_once,
)
from tvkd.tokenize import TokenizedPair, check_chat_template, tokenize_pair


class PrecomputeStopped(Exception):
    """should_stop() returned True. Finished shards are kept; calling again resumes."""


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
    teacher_check: Any = None  # tvkd.teacher_check.TeacherCheck, set by tvkd.pipeline.precompute


# --------------------------------------------------------------------------------------------
# The dataset pass


def _report(source: str, total: int, issues: list[RowIssue]) -> DataReport:
    return DataReport(source, total, kept=total - len(issues), dropped=len(issues), issues=issues)


def _report_from_store(source: str, store: ValueStore) -> DataReport:
    issues = [RowIssue(**d) for d in store.manifest.get("issues", [])]
    return _report(source, store.num_pairs, issues)


def _tokenize_shard(
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


def _check_all_rows(
    tokenizer: Any, pairs: Sequence[PreferencePair], source: str, config: PrecomputeConfig
) -> None:
    """on_error="raise": find every bad row before any teacher work (ids are not kept)."""
    _, issues = _tokenize_shard(tokenizer, pairs, range(len(pairs)), config)
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


def _check_finite(
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


def _check_store(store: ValueStore, pairs: Sequence[PreferencePair]) -> None:
    """A found store is reused only when every stored number is finite (NonFiniteError, code
    nonfinite_store, naming the store and the first bad pair, otherwise)."""
    bad = store.first_nonfinite()
    if bad is not None:
        i, name = bad
        row = pairs[i].row if i < len(pairs) else i
        raise NonFiniteError(
            "nonfinite_store",
            f"the value store {store.path} holds non-finite {name} (NaN/Inf) for pair {i} (row {row}); "
            "it is not reused: delete it and precompute again",
        )


def _fill_store(
    writer: StoreWriter,
    teacher: str | Path,
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    config: PrecomputeConfig,
    run: _Run,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    reference: Any = None,
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
        tokenized, issues = _tokenize_shard(tokenizer, pairs, writer.shard_range(i), config)
        records = _compute_shard(model, tokenized, config, pad_id, run, progress, should_stop, reference)
        _check_finite(str(teacher), pairs, writer.shard_range(i), records)  # before anything is written
        info = {
            "issues": [vars(issue) for issue in issues],
            "teacher_tokens": run.tokens - tokens0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        writer.write_shard(i, records, info=info)


def check_teacher_reference(
    config: PrecomputeConfig, teacher_reference: str | Path | None, tokenizer: Any
) -> None:
    """`q_source="implicit"` needs a teacher reference with the teacher's tokenizer (the two
    models score the same token ids). Raises ConfigError naming `teacher_reference`."""
    from tvkd.models import load_tokenizer, tokenizer_fingerprint

    if config.q_source != "implicit":
        return
    if not teacher_reference:
        raise ConfigError(
            "teacher_reference",
            "q_source='implicit' needs the model the teacher was DPO-trained from (e.g. its SFT checkpoint)",
        )
    if tokenizer_fingerprint(load_tokenizer(str(teacher_reference))) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            "teacher_reference",
            f"{teacher_reference} does not have the teacher's tokenizer (vocabulary, special tokens "
            "and chat template must be the same: both models score the teacher's token ids)",
        )


def precompute_key(
    teacher: str | Path,
    pairs: Sequence[PreferencePair],
    config: PrecomputeConfig,
    *,
    tokenizer: Any = None,
    teacher_reference: str | Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """(store key, key fields) of a precompute request, without loading the teacher's weights
    (they are hashed, with a per-file cache). Lets a caller ask whether it is cached.
    With `q_source="implicit"` the teacher reference and its weights are part of the key (it is
    ignored otherwise); ConfigError when it is missing or has another tokenizer."""
    from tvkd.models import load_tokenizer, model_fingerprint, tokenizer_fingerprint

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(teacher))
    config = within_window(config, str(teacher))  # 1024 and 512 are one length for a 512 window
    check_teacher_reference(config, teacher_reference, tokenizer)
    reference = None
    if config.q_source == "implicit":
        assert teacher_reference is not None
        reference = (str(teacher_reference), model_fingerprint(str(teacher_reference)))
    fields = key_fields(
        teacher=str(teacher),
        teacher_fingerprint=model_fingerprint(str(teacher)),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        dataset_fingerprint=dataset_fingerprint(pairs),
        config=config,
        teacher_reference=reference,
    )
    return content_key(fields), fields


def within_window(config: PrecomputeConfig, teacher: Any) -> PrecomputeConfig:
    """`config` with max_length at most the teacher's context window (`teacher`: a model folder
    or a transformers config); `config` itself when it already fits or no window is declared."""
    from tvkd.windows import config_window, model_window

    window = model_window(teacher) if isinstance(teacher, str) else config_window(teacher)
    if window is None or window.tokens >= config.max_length:
        return config
    return dataclasses.replace(config, max_length=window.tokens)


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
    teacher_reference: str | Path | None = None,
    reference_model: Any = None,
) -> PrecomputeResult:
    """Teacher values for `pairs` under `store_root`, computed once per content key.

    Pair i of the store is pairs[i]. `config.max_length` is capped at the teacher's context window
    (`within_window`; the store records the length used). Rows the teacher cannot take (too long
    after `config.truncation_mode`) are `missing` with
    on_error="drop"; with "raise" a DataError lists every such row before any teacher work.
    `model`/`tokenizer` skip loading them from `teacher` (which still names and fingerprints the
    teacher, so pass the matching path); a given model stays on its own device.
    `teacher_reference` (`reference_model` likewise) is the model the teacher was DPO-trained
    from, needed by `q_source="implicit"` (MATH.md) and part of the key then; ConfigError when
    it is missing or does not share the teacher's tokenizer.
    """
    from tvkd.models import load_causal_lm, load_tokenizer

    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop'; got {on_error!r}")
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(teacher))
    config = within_window(config, model.config if model is not None else str(teacher))
    key, fields = precompute_key(
        teacher, pairs, config, tokenizer=tokenizer, teacher_reference=teacher_reference
    )
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
        _check_store(found, pairs)
        return result(found, None)
    check_chat_template(tokenizer, pairs, source)
    if on_error == "raise":
        _check_all_rows(tokenizer, pairs, source, config)
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
                _check_store(found, pairs)
                return result(found, None, waited)
            if model is None:
                model = load_causal_lm(teacher, dtype=torch.float32, device=device)
            reference = None
            if config.q_source == "implicit":
                reference = reference_model
                if reference is None:
                    assert teacher_reference is not None  # checked by precompute_key
                    device = model_device(model)
                    reference = load_causal_lm(teacher_reference, dtype=torch.float32, device=device)
            run = _Run(total=len(pairs))
            with eval_mode(model), eval_mode(reference):
                _verify_first(str(teacher), model, tokenizer, pairs, config)
                if reference is not None:
                    _verify_first(f"{teacher}'s reference", reference, tokenizer, pairs, config)
                _fill_store(
                    writer, teacher, model, tokenizer, pairs, config, run, progress, should_stop, reference
                )
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
