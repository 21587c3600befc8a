"""The sharded teacher pass (tvkd.precompute.precompute_shards / finalize_if_complete and
`torchrun ... -m tvkd.cli precompute`) on the real tiny teacher of tests/conftest.py: two torchrun
ranks write a store bit-identical to one process's, a rank killed with SIGKILL leaves finished
shards that a rerun keeps, overlapping shard lists compute each shard once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tvkd.config import PrecomputeConfig
from tvkd.data import PreferencePair, load_pairs
from tvkd.precompute import finalize_if_complete, precompute_shards, precompute_values, rank_shards
from tvkd.store import MANIFEST, StoreWriter, ValueStore, shard_name
from tvkd.store_compare import store_differences

_WORDS = "the quick brown fox jumps over a lazy dog while helpful assistants answer"
CONFIG = {"shard_size": 2, "batch_tokens": 64, "max_length": 128}  # 7 pairs: 4 shards


@pytest.fixture(autouse=True)
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvkd-cache"))


def _data(tmp_path: Path, n: int = 7) -> tuple[Path, list[PreferencePair]]:
    """`n` pairs of varied lengths in a JSONL file, and as loaded from it."""
    words = _WORDS.split()
    rng = np.random.default_rng(11)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words, int(rng.integers(lo, hi + 1))))

    rows = [
        {
            "prompt": f"Human: {text(3, 15)}\n\nAssistant:",
            "chosen": " " + text(1, 30),
            "rejected": " " + text(1, 30),
        }
        for _ in range(n)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = load_pairs(path, on_error="raise")
    return path, pairs


def test_rank_shards_round_robin() -> None:
    assert [list(rank_shards(7, r, 3)) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="rank 2"):
        rank_shards(7, 2, 2)


def test_torchrun_two_ranks_write_the_one_process_store(tmp_path: Path, precompute_teacher: str) -> None:
    data, pairs = _data(tmp_path)
    one = precompute_values(
        precompute_teacher, pairs, PrecomputeConfig(**CONFIG), store_root=tmp_path / "one"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "tvkd.cli", "precompute", "--teacher", precompute_teacher, "--data", str(data),
        "--store-root", str(tmp_path / "two"), "--device", "cpu",
        "--shard-size", "2", "--batch-tokens", "64", "--max-length", "128",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"key:        {one.key}" in proc.stdout and "cached:     no" in proc.stdout
    assert "[rank 1/2] precompute: " in proc.stderr and "[rank 0/2] precompute: " in proc.stderr
    two = ValueStore.open(tmp_path / "two" / one.key)
    assert store_differences(one.store, two) == []
    made_by = two.manifest["timings"]["shards"]
    assert [m["rank"] for m in made_by] == [0, 1, 0, 1]
    assert made_by[0]["pid"] == made_by[2]["pid"] != made_by[1]["pid"] == made_by[3]["pid"]
    assert not list(two.path.glob(".lock-*"))  # the shard locks go with the finished store


_KILLED_RANK = """
import os, sys, time
os.environ["TVKD_CACHE_DIR"] = {cache!r}
from tvkd.config import PrecomputeConfig
from tvkd.data import load_pairs
from tvkd.precompute import precompute_shards
pairs, _ = load_pairs({data!r}, on_error="raise")
precompute_shards({teacher!r}, pairs, PrecomputeConfig(**{config!r}), store_root={root!r},
                  shards=range(4), made_by={{"rank": 1}}, progress=lambda done, total: time.sleep(0.3))
"""


def test_killed_rank_leaves_finished_shards_that_a_rerun_keeps(
    tmp_path: Path, precompute_teacher: str
) -> None:
    data, pairs = _data(tmp_path)
    config = PrecomputeConfig(**CONFIG)
    one = precompute_values(precompute_teacher, pairs, config, store_root=tmp_path / "one")
    root = tmp_path / "killed"
    code = _KILLED_RANK.format(
        cache=os.environ["TVKD_CACHE_DIR"],
        teacher=precompute_teacher,
        config=CONFIG,
        root=str(root),
        data=str(data),
    )
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)])
    folder = root / one.key
    deadline = time.monotonic() + 120
    while not (folder / shard_name(0)).exists():  # kill it once its first shard is written
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    written = {p.name: p.stat().st_ino for p in folder.glob("shard-*")}
    assert shard_name(0) in written and len(written) < 4
    assert finalize_if_complete(root, one.key, one.store.fields, num_pairs=7, config=config) is None
    assert not (folder / MANIFEST).exists()

    res = precompute_shards(precompute_teacher, pairs, config, store_root=root, shards=range(4))
    assert res.computed == [i for i in range(4) if shard_name(i) not in written]  # the dead lock is free
    assert {n: (folder / n).stat().st_ino for n in written} == written  # finished shards kept as they were
    store = finalize_if_complete(root, res.key, res.fields, num_pairs=7, config=res.config)
    assert store is not None
    assert store_differences(one.store, store) == []
    assert store.manifest["timings"]["shards"][0]["rank"] == 1  # written by the killed process


def test_overlapping_shard_lists_compute_each_shard_once(tmp_path: Path, precompute_teacher: str) -> None:
    _, pairs = _data(tmp_path)
    config = PrecomputeConfig(**CONFIG)
    first = precompute_shards(precompute_teacher, pairs, config, store_root=tmp_path, shards=[0, 1])
    assert first.computed == [0, 1] and first.tokens > 0 and not first.complete
    again = precompute_shards(precompute_teacher, pairs, config, store_root=tmp_path, shards=[1, 2, 3])
    assert again.computed == [2, 3]
    store = finalize_if_complete(tmp_path, first.key, first.fields, num_pairs=7, config=config)
    assert store is not None and store.manifest["teacher_tokens"] == first.tokens + again.tokens
    done = precompute_shards(precompute_teacher, pairs, config, store_root=tmp_path, shards=[0])
    assert done.complete and done.computed == [] and done.tokens == 0
    with pytest.raises(ValueError, match=r"outside the store's 4 shards"):
        precompute_shards(precompute_teacher, pairs, config, store_root=tmp_path / "x", shards=[4])


def test_a_helper_passes_by_a_shard_another_process_holds(tmp_path: Path, precompute_teacher: str) -> None:
    _, pairs = _data(tmp_path)
    config = PrecomputeConfig(**CONFIG)
    res = precompute_shards(precompute_teacher, pairs, config, store_root=tmp_path, shards=[])
    other = StoreWriter(tmp_path, res.key, fields={}, num_pairs=7, shard_size=2, arrays=["chosen_values"])
    with other.acquire_shard(1):  # another open file: flock conflicts as with another process
        helper = precompute_shards(
            precompute_teacher, pairs, config, store_root=tmp_path, shards=[1, 2, 0, 3], wait_for_busy=False
        )
        assert helper.computed == [2, 0, 3]  # in the given order, the held shard left to its holder
    last = precompute_shards(precompute_teacher, pairs, config, store_root=tmp_path, shards=range(4))
    assert last.computed == [1]  # its holder let go without writing it: computed here
    assert finalize_if_complete(tmp_path, res.key, res.fields, num_pairs=7, config=res.config) is not None


def test_shard_locks_are_separate(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, "k", fields={}, num_pairs=4, shard_size=2, arrays=["chosen_values"])
    other = StoreWriter(tmp_path, "k", fields={}, num_pairs=4, shard_size=2, arrays=["chosen_values"])
    with w.acquire_shard(0), other.acquire_shard(1) as waited, other.acquire(timeout=1) as waited_key:
        assert waited < 0.5 and waited_key < 0.5  # shard 1 and the key are free while 0 is held
        from tvkd.store import StoreLockTimeout

        with pytest.raises(StoreLockTimeout), other.acquire_shard(0, should_stop=lambda: True, poll=0.01):
            pass


def test_store_differences_sees_one_changed_byte(tmp_path: Path, precompute_teacher: str) -> None:
    import shutil

    _, pairs = _data(tmp_path)
    one = precompute_values(precompute_teacher, pairs, PrecomputeConfig(**CONFIG), store_root=tmp_path / "a")
    copy = tmp_path / "b" / one.key
    shutil.copytree(one.store.path, copy)
    assert store_differences(one.store, ValueStore.open(copy)) == []
    shard = copy / shard_name(3)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    shard.write_bytes(bytes(data))
    diff = store_differences(one.store, ValueStore.open(copy))
    assert len(diff) == 1 and diff[0].startswith(f"{shard_name(3)}: ") and diff[0].endswith(" differs")


_TRAIN_RANK = """
import os, sys, time
os.environ.update(RANK=sys.argv[1], WORLD_SIZE="2", LOCAL_RANK=sys.argv[1], TVKD_CACHE_DIR={cache!r})
from tvkd import pipeline
from tvkd.callbacks import Callbacks
from tvkd.config import JobSpec, TrainConfig

class Slow(Callbacks):  # each batch a little slower, so that both ranks are at work together
    def on_progress(self, stage, done, total, eta):
        time.sleep(0.2)

spec = JobSpec(teacher={teacher!r}, student={teacher!r}, dataset={data!r},
               train=TrainConfig.from_dict({{"max_length": 128}}), output_dir={out!r} + sys.argv[1],
               store_root={root!r})
result = pipeline.precompute(spec, pipeline.validate(spec), Slow(), shard_size=2)
print(result.store.path)
"""


def test_tvkd_train_ranks_share_the_precompute(tmp_path: Path, precompute_teacher: str) -> None:
    """pipeline.precompute under torchrun's environment (as `tvkd train` runs it on each rank):
    both ranks compute shards and the store is the one-process store."""
    from tvkd import pipeline
    from tvkd.config import JobSpec, TrainConfig

    data, pairs = _data(tmp_path, 16)
    code = _TRAIN_RANK.format(
        cache=os.environ["TVKD_CACHE_DIR"], teacher=precompute_teacher, data=str(data),
        out=str(tmp_path / "job"), root=str(tmp_path / "ranks"),
    )  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(r)], stdout=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    paths = {rank.communicate(timeout=300)[0].strip().splitlines()[-1] for rank in ranks}
    assert [rank.returncode for rank in ranks] == [0, 0] and len(paths) == 1
    store = ValueStore.open(paths.pop())
    assert {m["rank"] for m in store.manifest["timings"]["shards"]} == {0, 1}
    spec = JobSpec(
        teacher=precompute_teacher, student=precompute_teacher, dataset=str(data),
        train=TrainConfig.from_dict({"max_length": 128}), output_dir=str(tmp_path / "one"),
        store_root=str(tmp_path / "one"),
    )  # fmt: skip
    one = precompute_values(
        precompute_teacher, pairs, pipeline.precompute_config(spec, 2), store_root=tmp_path / "one"
    )
    assert store_differences(one.store, store) == []
