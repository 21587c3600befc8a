"""The teacher pass over a dataset: V_φ at every response state of every pair, into a
content-addressed value store (`tvkd.store`), computed once per key.

The forward itself is `tvkd.teacher`. Work is cut into shards of `shard_size` pairs. A shard is
tokenized when it is reached, its two sequences per pair are sorted by length and packed into
batches of at most `batch_tokens` padded tokens, and it is written as soon as it is done; only
that shard's results are ever held, and a stopped or killed run resumes at the first unwritten
shard. The store key is computed before the teacher is loaded, so a cache hit costs a tokenizer
load and the fingerprints.

Many processes: `precompute_shards` computes only the shards it is given (torchrun rank r takes
shards r, r+world, ...: `rank_shards`; a Celery shard task takes its slice), each under its shard
lock, and `finalize_if_complete` writes the manifest once every shard is on disk. A shard's
numbers do not depend on which process computes it, so the store is bit-identical to a
one-process precompute (tests/test_precompute_shards.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tvkd.config import ConfigError, PrecomputeConfig
from tvkd.data import DataError, DataReport, PreferencePair, RowIssue, dataset_fingerprint
from tvkd.numerics import NonFiniteError
from tvkd.shard_pass import LazyTeacher, Run, check_all_rows, fill_shards, report
from tvkd.shard_pass import PrecomputeStopped as PrecomputeStopped  # re-exported: callers catch it here
from tvkd.store import StoreLockTimeout, StoreWriter, ValueStore, content_key, key_fields, store_arrays
from tvkd.tokenize import check_chat_template


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


@dataclass
class ShardsResult:
    """What one `precompute_shards` call did (the store is complete only once every shard is)."""

    key: str
    fields: dict[str, Any]  # the key fields (for `finalize_if_complete`)
    config: PrecomputeConfig  # the config used (max_length capped at the teacher's window)
    num_shards: int  # shards of the whole store
    computed: list[int]  # shards this call computed
    tokens: int  # teacher tokens run through the teacher this call
    forward_seconds: float
    seconds: float
    device: str
    complete: bool = False  # the store was already complete (nothing was done)


def store_report(source: str, store: ValueStore) -> DataReport:
    """The data report of a complete store (the rows the teacher could not take)."""
    issues = [RowIssue(**d) for d in store.manifest.get("issues", [])]
    return report(source, store.num_pairs, issues)


def _writer(
    store_root: str | Path, key: str, fields: dict[str, Any], num_pairs: int, config: PrecomputeConfig
) -> StoreWriter:
    arrays = store_arrays(config.topk, config.token_stats)
    return StoreWriter(
        store_root,
        key,
        fields=fields,
        num_pairs=num_pairs,
        shard_size=config.shard_size,
        arrays=arrays,
        topk=config.topk,
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


def check_teacher_reference(
    config: PrecomputeConfig, teacher_reference: str | Path | None, tokenizer: Any
) -> None:
    """`q_source="implicit"` needs a teacher reference with the teacher's tokenizer (the two
    models score the same token ids). Raises ConfigError naming `teacher_reference`."""
    from tvkd.fingerprints import tokenizer_fingerprint
    from tvkd.models import load_tokenizer

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
    from tvkd.fingerprints import model_fingerprint, tokenizer_fingerprint
    from tvkd.models import load_tokenizer

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
    from tvkd.models import load_tokenizer

    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop'; got {on_error!r}")
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(teacher))
    config = within_window(config, model.config if model is not None else str(teacher))
    key, fields = precompute_key(
        teacher, pairs, config, tokenizer=tokenizer, teacher_reference=teacher_reference
    )
    source = f"precompute({teacher}, max_length={config.max_length})"

    def result(store: ValueStore, run: Run | None, waited: float = 0.0) -> PrecomputeResult:
        rep = store_report(source, store)
        if on_error == "raise" and rep.issues:
            raise DataError(rep)
        secs = time.perf_counter() - start
        tokens = run.tokens if run else 0
        tps = tokens / run.forward_seconds if run and run.forward_seconds > 0 else 0.0
        return PrecomputeResult(store, key, run is None, rep, len(pairs), tokens, secs, tps, waited)

    found = ValueStore.find(store_root, key)
    if found is not None:
        _check_store(found, pairs)
        return result(found, None)
    check_chat_template(tokenizer, pairs, source)
    if on_error == "raise":
        check_all_rows(tokenizer, pairs, source, config)
    writer = _writer(store_root, key, fields, len(pairs), config)
    lazy = LazyTeacher(
        teacher, tokenizer, pairs, config, device=device, model=model,
        teacher_reference=teacher_reference, reference_model=reference_model,
    )  # fmt: skip
    try:
        with writer.acquire(should_stop=should_stop) as waited, lazy:
            found = writer.find_complete()  # another process may have finished it while we waited
            if found is not None:
                _check_store(found, pairs)
                return result(found, None, waited)
            run = Run(total=len(pairs))
            fill_shards(
                writer, range(writer.num_shards), lazy, pairs, run, progress=progress, should_stop=should_stop
            )
            store = writer.finalize(timings=_timings(start, run, lazy.device_name))
            return result(store, run, waited)
    except StoreLockTimeout as exc:
        if exc.stopped:
            raise PrecomputeStopped(str(exc)) from exc
        raise


def _timings(start: float, run: Run, device: str) -> dict[str, Any]:
    return {
        "seconds": round(time.perf_counter() - start, 3),
        "forward_seconds": round(run.forward_seconds, 3),
        "teacher_tokens_this_run": run.tokens,
        "device": device,
    }


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """The shards rank `rank` of `world_size` computes: rank, rank + world_size, ... (round robin,
    so ranks get neighbouring shards of similar lengths)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return range(rank, num_shards, world_size)


def part_order(num_shards: int, part: int, parts: int) -> list[int]:
    """Every shard, those of `part` (i ≡ part mod parts) first: the order in which part `part` of a
    store split `parts` ways takes them, so that it shares the others' work once its own is done."""
    own = list(rank_shards(num_shards, part, parts))
    return own + [i for i in range(num_shards) if i % parts != part]


def num_shards(num_pairs: int, config: PrecomputeConfig) -> int:
    """Shards of a store of `num_pairs` pairs (`config.shard_size` pairs each)."""
    return -(-num_pairs // config.shard_size)


def precompute_shards(
    teacher: str | Path,
    pairs: Sequence[PreferencePair],
    config: PrecomputeConfig,
    *,
    store_root: str | Path,
    shards: Iterable[int],
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_error: Literal["raise", "drop"] = "drop",
    model: Any = None,
    tokenizer: Any = None,
    teacher_reference: str | Path | None = None,
    reference_model: Any = None,
    made_by: Mapping[str, Any] | None = None,
    wait_for_busy: bool = True,
) -> ShardsResult:
    """Compute only `shards` of the store `precompute_values` would write for the same arguments;
    no manifest (`finalize_if_complete` writes it once every shard is on disk).

    Shards are taken in the given order, each under its own lock; a shard already written, or
    written by another process while this one waited for its lock, is skipped, so overlapping
    calls are harmless. Shards another process is computing are passed by and, with
    `wait_for_busy`, waited for at the end (and computed if that process died); without it they
    are left to that process (a helper that only speeds up a store someone else completes).
    `progress(done, total)` counts the pairs of `shards`. `made_by` (JSON-serialisable: rank,
    worker, task) is recorded in each shard this call writes, with host and pid. Arguments and
    errors as `precompute_values`; ValueError for a shard index outside the store. Raises
    PrecomputeStopped when should_stop() (finished shards are kept).
    """
    from tvkd.models import load_tokenizer

    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop'; got {on_error!r}")
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(teacher))
    config = within_window(config, model.config if model is not None else str(teacher))
    key, fields = precompute_key(
        teacher, pairs, config, tokenizer=tokenizer, teacher_reference=teacher_reference
    )
    wanted = list(dict.fromkeys(shards))
    total = num_shards(len(pairs), config)
    outside = [i for i in wanted if not 0 <= i < total]
    if outside:
        raise ValueError(f"shards {outside[:10]} are outside the store's {total} shards")

    def result(run: Run | None, computed: list[int], device_name: str) -> ShardsResult:
        tokens, forward = (run.tokens, run.forward_seconds) if run else (0, 0.0)
        secs = time.perf_counter() - start
        return ShardsResult(
            key, fields, config, total, computed, tokens, forward, secs, device_name, run is None
        )

    if ValueStore.find(store_root, key) is not None:
        return result(None, [], str(device))
    source = f"precompute({teacher}, max_length={config.max_length})"
    check_chat_template(tokenizer, pairs, source)
    if on_error == "raise":
        check_all_rows(tokenizer, pairs, source, config)
    writer = _writer(store_root, key, fields, len(pairs), config)
    run = Run(total=sum(len(writer.shard_range(i)) for i in wanted))
    lazy = LazyTeacher(
        teacher, tokenizer, pairs, config, device=device, model=model,
        teacher_reference=teacher_reference, reference_model=reference_model,
    )  # fmt: skip
    try:
        with lazy:
            computed = fill_shards(
                writer,
                wanted,
                lazy,
                pairs,
                run,
                progress=progress,
                should_stop=should_stop,
                made_by=made_by,
                wait_for_busy=wait_for_busy,
            )
            return result(run, computed, lazy.device_name)
    except StoreLockTimeout as exc:
        if exc.stopped:
            raise PrecomputeStopped(str(exc)) from exc
        raise


def finalize_if_complete(
    store_root: str | Path,
    key: str,
    fields: dict[str, Any],
    *,
    num_pairs: int,
    config: PrecomputeConfig,
    timings: Mapping[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ValueStore | None:
    """The complete store of `key`: found, or finalized here (manifest written, under the key's
    lock) when every shard is on disk; None while a shard is missing.

    `fields` and `config` are a `ShardsResult`'s (or `precompute_key`'s and the capped config).
    Waits for a one-process precompute holding the key's lock. Raises PrecomputeStopped when
    should_stop() during that wait."""
    writer = _writer(store_root, key, fields, num_pairs, config)
    try:
        with writer.acquire(should_stop=should_stop):
            found = writer.find_complete()
            if found is not None:
                return found
            if writer.done_shards() != set(range(writer.num_shards)):
                return None
            return writer.finalize(timings=timings)
    except StoreLockTimeout as exc:
        if exc.stopped:
            raise PrecomputeStopped(str(exc)) from exc
        raise
