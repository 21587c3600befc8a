"""The value store on its own (no model): keys, shard round-trip, missing pairs, resume
bookkeeping, size per token, and the per-key lock."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tvkd.config import PrecomputeConfig
from tvkd.store import (
    MANIFEST,
    PairValues,
    StoreError,
    StoreLockTimeout,
    StoreWriter,
    ValueStore,
    content_key,
    key_fields,
    shard_name,
    store_arrays,
)


def _fields(**config_kw: object) -> dict:
    return key_fields(
        teacher="teachers/tiny",
        teacher_fingerprint="t" * 64,
        tokenizer_fingerprint="k" * 64,
        dataset_fingerprint="d" * 64,
        config=PrecomputeConfig(**config_kw),
    )


def test_key_covers_what_changes_the_numbers_and_nothing_else() -> None:
    base = content_key(_fields())
    assert len(base) == 32 and base == content_key(_fields())
    # Batching, chunking and the file split change float order at most: same store.
    assert content_key(_fields(batch_tokens=17, chunk_size=3, shard_size=5)) == base
    assert content_key(_fields(value_beta=1)) == base  # int and float spelling hash alike
    for change in (
        {"q_source": "logprobs"},
        {"value_beta": 0.5},
        {"max_length": 512},
        {"topk": 4},
        {"token_stats": True},
        {"bf16": True},
    ):
        assert content_key(_fields(**change)) != base, change
    other = dict(_fields(), dataset_fingerprint="e" * 64)
    assert content_key(other) != base
    assert content_key(dict(_fields(), tokenizer_fingerprint="x")) != base


def _record(rng: np.random.Generator, t_chosen: int, t_rejected: int, k: int, stats: bool) -> PairValues:
    def side(t: int) -> dict:
        out = {"values": rng.standard_normal(t + 1).astype(np.float32)}
        if stats:
            out["token_logps"] = rng.standard_normal(t).astype(np.float32)
            out["token_logits"] = rng.standard_normal(t).astype(np.float32)
        if k:
            out["topk_logits"] = rng.standard_normal((t + 1, k)).astype(np.float32)
            out["topk_ids"] = rng.integers(0, 500, (t + 1, k)).astype(np.int32)
        return out

    c, r = side(t_chosen), side(t_rejected)
    return PairValues(
        **{f"chosen_{n}": a for n, a in c.items()}, **{f"rejected_{n}": a for n, a in r.items()}
    )


def _writer(root: Path, n: int, shard_size: int, k: int = 0, stats: bool = False) -> StoreWriter:
    return StoreWriter(
        root,
        "k" * 32,
        fields={"test": True},
        num_pairs=n,
        shard_size=shard_size,
        arrays=store_arrays(k, stats),
        topk=k,
    )


@pytest.mark.parametrize(("k", "stats"), [(0, False), (3, True)])
def test_round_trip_with_missing_pairs(tmp_path: Path, k: int, stats: bool) -> None:
    rng = np.random.default_rng(0)
    n, shard_size = 7, 3
    records: list[PairValues | None] = [
        _record(rng, int(rng.integers(1, 20)), int(rng.integers(1, 20)), k, stats) for _ in range(n)
    ]
    records[1] = records[6] = None
    w = _writer(tmp_path, n, shard_size, k, stats)
    assert w.num_shards == 3 and w.done_shards() == set()
    for i in range(w.num_shards):
        rng_i = w.shard_range(i)
        w.write_shard(i, records[rng_i.start : rng_i.stop], info={"teacher_tokens": 10})
        assert ValueStore.find(tmp_path, w.key) is None  # not findable before the manifest
    assert w.done_shards() == {0, 1, 2}
    store = w.finalize(timings={"seconds": 1.0})

    found = ValueStore.find(tmp_path, w.key)
    assert found is not None and found.path == store.path
    assert len(store) == n and store.missing == {1, 6}
    assert 1 not in store and 0 in store and n not in store
    with pytest.raises(KeyError, match="could not take"):
        store.pair(1)
    with pytest.raises(KeyError, match="out of range"):
        store.pair(n)
    expected_tokens = sum(r.response_tokens() for r in records if r is not None)
    assert store.response_tokens() == expected_tokens
    assert store.manifest["teacher_tokens"] == 30 and store.manifest["complete"] is True
    for i, rec in enumerate(records):
        if rec is None:
            continue
        got = store.pair(i)
        for name in store_arrays(k, stats):
            np.testing.assert_array_equal(getattr(got, name), getattr(rec, name))
        absent = set(PairValues.__dataclass_fields__) - set(store_arrays(k, stats))
        assert all(getattr(got, name) is None for name in absent)
    if k:
        assert store.pair(0).chosen_topk_ids.dtype == np.int32
        assert store.pair(0).chosen_topk_logits.shape[1] == k
    assert store.nbytes() == sum(p.stat().st_size for p in store.path.iterdir())


def test_values_only_store_is_small(tmp_path: Path) -> None:
    # Response lengths like real chat data (tens to hundreds of tokens): V is float32 at T+1
    # states plus 8-byte offsets per row and the headers/manifest.
    rng = np.random.default_rng(1)
    n = 300
    w = _writer(tmp_path, n, 128)
    records = [
        _record(rng, int(rng.integers(10, 200)), int(rng.integers(10, 200)), 0, False) for _ in range(n)
    ]
    for i in range(w.num_shards):
        r = w.shard_range(i)
        w.write_shard(i, records[r.start : r.stop])
    store = w.finalize()
    assert store.bytes_per_response_token() <= 4.5


def test_open_refuses_an_incomplete_store(tmp_path: Path) -> None:
    w = _writer(tmp_path, 2, 1)
    w.write_shard(0, [None])
    with pytest.raises(StoreError, match="not written"):
        w.finalize()
    with pytest.raises(StoreError, match="not a complete"):
        ValueStore.open(w.path)
    (w.path / MANIFEST).write_text(json.dumps({"complete": False}))
    with pytest.raises(StoreError, match="not complete"):
        ValueStore.open(w.path)
    assert ValueStore.find(tmp_path, w.key) is None


def test_resume_bookkeeping_ignores_shards_of_another_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    recs = [_record(rng, 3, 4, 0, False) for _ in range(4)]
    old = _writer(tmp_path, 4, 1)
    for i in range(4):
        old.write_shard(i, recs[i : i + 1])
    (old.path / (shard_name(0) + ".tmp")).write_bytes(b"half a write")
    new = _writer(tmp_path, 4, 2)  # same key, other shard_size: old shards are not reused
    assert new.done_shards() == set()
    new.write_shard(0, recs[:2])
    new.write_shard(1, recs[2:])
    store = new.finalize()
    names = sorted(p.name for p in store.path.iterdir())
    assert names == [MANIFEST, shard_name(0), shard_name(1)]  # strays and the .tmp are gone
    np.testing.assert_array_equal(store.pair(3).rejected_values, recs[3].rejected_values)


def test_write_shard_checks_its_input(tmp_path: Path) -> None:
    w = _writer(tmp_path, 3, 2, k=0, stats=True)
    with pytest.raises(ValueError, match="takes 2 records"):
        w.write_shard(0, [None])
    rec = _record(np.random.default_rng(3), 2, 2, 0, False)  # no token stats
    with pytest.raises(ValueError, match="lacks"):
        w.write_shard(0, [rec, None])


def test_lock_is_exclusive_and_can_be_abandoned(tmp_path: Path) -> None:
    w = _writer(tmp_path, 1, 1)
    with w.acquire() as waited:
        assert waited < 1.0
        other = _writer(tmp_path, 1, 1)  # another open file description: flock conflicts
        with pytest.raises(StoreLockTimeout) as exc, other.acquire(timeout=0.3, poll=0.05):
            pass
        assert not exc.value.stopped
        with pytest.raises(StoreLockTimeout) as exc, other.acquire(should_stop=lambda: True, poll=0.05):
            pass
        assert exc.value.stopped


def test_lock_waiter_proceeds_when_the_holder_releases(tmp_path: Path) -> None:
    w = _writer(tmp_path, 1, 1)
    got: list[float] = []
    with w.acquire():
        t = threading.Thread(target=lambda: got.append(_hold(tmp_path)))
        t.start()
        time.sleep(0.4)
        assert not got  # still waiting
    t.join(timeout=5)
    assert got and got[0] >= 0.3


def _hold(root: Path) -> float:
    with _writer(root, 1, 1).acquire(poll=0.05) as waited:
        return waited
