"""tvkd.distributed: the context from torchrun's environment, and the collectives under a real
2-process torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tvkd import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_context_without_torchrun_is_world_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0)
    assert ctx.is_main and not ctx.enabled
    # Every collective is a no-op that returns its input.
    distributed.barrier()
    assert distributed.any_flag(True) and not distributed.any_flag(False)
    assert distributed.reduce_mean({"loss": 1.5}) == {"loss": 1.5}
    distributed.destroy()


def test_context_reads_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 1)
    assert ctx.enabled and not ctx.is_main


@pytest.mark.parametrize(("rank", "world"), [("4", "4"), ("x", "2")])
def test_context_rejects_bad_env(monkeypatch: pytest.MonkeyPatch, rank: str, world: str) -> None:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match="RANK"):
        distributed.context()


WORKER = textwrap.dedent(
    """
    import json, sys
    from tvkd import distributed
    ctx = distributed.init()
    out = {"rank": ctx.rank, "world": ctx.world_size, "enabled": ctx.enabled, "main": ctx.is_main}
    out["any_rank1"] = distributed.any_flag(ctx.rank == 1)  # only rank 1 raises the flag
    out["any_none"] = distributed.any_flag(False)
    out["mean"] = distributed.reduce_mean({"b": 10.0 * ctx.rank, "a": 1.0 + ctx.rank})
    try:
        distributed.reduce_mean({"a": 1.0} if ctx.rank == 0 else {"c": 1.0})
    except ValueError as exc:
        out["mismatch"] = "different metrics" in str(exc)
    distributed.barrier()
    distributed.destroy()
    with open(sys.argv[1] + f"/rank{ctx.rank}.json", "w") as f:
        json.dump(out, f)
    """
)


@pytest.mark.slow
def test_collectives_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    cmd += [str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["enabled"], res["main"]) == (r, 2, True, r == 0)
        assert res["any_rank1"] is True  # rank 0 sees rank 1's flag
        assert res["any_none"] is False
        assert res["mean"] == {"a": 1.5, "b": 5.0}  # (1+2)/2, (0+10)/2
        assert res["mismatch"] is True


def test_parallel_layout_in_one_process() -> None:
    from tvkd.parallel import Parallel, resolve_mode

    assert resolve_mode("fsdp", 1) == "single" and resolve_mode("auto", 2) == "ddp"
    assert resolve_mode("ddp", 4) == "ddp" and resolve_mode("fsdp", 2) == "fsdp"
    with pytest.raises(ValueError, match="parallel='zero3'"):
        resolve_mode("zero3", 2)
    par = Parallel("fsdp")  # one process: every micro-batch here, with factor 1
    assert par.mode == "single"
    assert par.shard([["a"], ["b"], ["c"]]) == [(["a"], 1.0), (["b"], 1.0), (["c"], 1.0)]
    assert par.sum({"loss": 2.5}) == {"loss": 2.5}


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        (0, [("m0", 2.0), ("m2", 2.0)]),
        (1, [("m1", 2.0), ("m0", 0.0)]),  # one micro-batch short: a weight-0 copy keeps step with rank 0
    ],
)
def test_parallel_shard_keeps_the_global_batch(monkeypatch, rank: int, expected) -> None:
    from tvkd.distributed import DistContext
    from tvkd.parallel import Parallel

    par = Parallel("ddp")
    par.ctx = DistContext(rank=rank, world_size=2, local_rank=rank)
    assert par.shard(["m0", "m1", "m2"]) == expected
