"""The process group of a run launched by `torchrun`, and the few collectives the library uses.

`torchrun` (torch.distributed.run) starts N processes and sets RANK, WORLD_SIZE and LOCAL_RANK
in each one's environment; a plain `python`/`tvkd` process has none of them and is world size 1.
Everything here is a no-op at world size 1, so library code calls it unconditionally. The
backend is gloo on CPU and nccl when CUDA is available (PyTorch's own process group; no
home-made transport).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: `rank` of `world_size`, `local_rank` on its node."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, events, metrics and trackers."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (collectives do something)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from exc


def context() -> DistContext:
    """This process's rank, world size and local rank from torchrun's environment (RANK,
    WORLD_SIZE, LOCAL_RANK); rank 0 of world size 1 when they are unset.

    Raises ValueError when they are not integers or RANK is not below WORLD_SIZE."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def init(backend: str | None = None) -> DistContext:
    """Join the process group when WORLD_SIZE > 1 (once; later calls return the context).

    `backend` defaults to nccl when CUDA is available (each process then uses device
    `cuda:LOCAL_RANK`) and gloo otherwise. The rendezvous is torchrun's (MASTER_ADDR/PORT env).
    """
    ctx = context()
    if ctx.enabled and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    return ctx


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where collectives' tensors live: the current CUDA device under nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (no-op at world size 1)."""
    if _active():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_flag(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (all-reduce MAX): how rank 0's "stop
    requested" reaches the others at the same step. `flag` itself at world size 1."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each metric (float64 all-reduce SUM / world size), the same dict on
    every rank; `metrics` unchanged at world size 1. Every rank must pass the same keys
    (sorted before the reduction, so the order of insertion does not matter).

    Raises ValueError when the ranks' key sets differ."""
    if not _active():
        return dict(metrics)
    keys = sorted(metrics)
    world = dist.get_world_size()
    # A cheap check that every rank names the same metrics (a mismatch would silently mix them).
    names: list[list[str] | None] = [None] * world
    dist.all_gather_object(names, keys)
    if any(n != keys for n in names):
        raise ValueError(f"reduce_mean: ranks report different metrics: {names}")
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}
