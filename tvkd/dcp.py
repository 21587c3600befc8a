"""Checkpoints of a run under `torchrun`: `torch.distributed.checkpoint` (DCP), sharded.

A checkpoint written by N > 1 processes is `checkpoints/step-NNNNNN/` with `dcp/` (the model's
trainable weights and the optimizer state, each rank writing its own shards: DCP's format,
keyed by parameter name, `torch.distributed.checkpoint.state_dict.get_state_dict`), and from
rank 0 `scheduler.pt`, `rng.pt` and `state.json` last (`tvkd.checkpoint`'s marker of a complete
checkpoint). A one-process run keeps `tvkd.checkpoint`'s format (model.safetensors,
optimizer.pt). Either format loads at any world size: DCP reshards on load (train on 2
processes, resume on 1, and the reverse), and a one-process checkpoint is loaded as a full state
dict (`set_state_dict(full_state_dict=True)`) into the DDP replica or the FSDP shards.

Assumed: the output folder is on a filesystem every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from tvkd import checkpoint as ckpt_io
from tvkd import distributed

DCP_DIR = "dcp"
OPTIONS = StateDictOptions(ignore_frozen_params=True)  # LoRA: only the adapters are trained


def is_sharded(ckpt: Path) -> bool:
    """Whether `ckpt` was written by `save_sharded` (else it is a one-process checkpoint)."""
    return (ckpt / DCP_DIR).is_dir()


def save_sharded(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` from every rank (a collective: all call it) and keep the newest
    `keep`; returns its folder. Written into a temporary folder that rank 0 renames into place
    once every rank's shards are on disk."""
    ctx = distributed.context()
    final = ckpt_io.checkpoint_path(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)
    distributed.barrier()
    if ctx.is_main:
        state = {**state, "world_size": ctx.world_size, "format": "dcp"}
        ckpt_io.commit_checkpoint(tmp, final, scheduler=scheduler, state=state, keep=keep)
    distributed.barrier()
    return final


def _optimizer_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict:
    """A `torch.optim` state dict (parameters numbered in param-group order) keyed by parameter
    name instead, as `set_optimizer_state_dict` takes it."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


def load_any(
    ckpt: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `ckpt` (either format) into the
    model as wrapped now (plain, DDP's replica or FSDP shards); returns its `state.json`.

    Raises ValueError when the checkpoint holds other trainable parameters than `model` has.
    """
    state = json.loads((ckpt / ckpt_io.STATE_FILE).read_text())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if is_sharded(ckpt):
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
        saved = set(dcp.FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata)
        # What this model would save (tied weights under each of their names) is what must be there.
        if {f"model.{k}" for k in model_sd} != {k for k in saved if k.startswith("model.")}:
            raise ValueError(_mismatch(ckpt))
        both = {"model": model_sd, "optim": optim_sd}
        dcp.load(both, checkpoint_id=ckpt / DCP_DIR)
        set_state_dict(
            model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"], options=OPTIONS
        )
    else:
        tensors = load_file(ckpt / "model.safetensors", device="cpu")
        if set(tensors) != trainable:
            raise ValueError(_mismatch(ckpt))
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, tensors, options=full)
        saved_optim = torch.load(ckpt / "optimizer.pt", map_location="cpu")
        set_optimizer_state_dict(
            model, optimizer, _optimizer_by_name(model, optimizer, saved_optim), options=full
        )
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt"))
    # Our own file (python/numpy RNG states are not tensors, so not weights-only loadable).
    ckpt_io.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    return state


def _mismatch(ckpt: Path) -> str:
    return (
        f"{ckpt} holds other trainable parameters than this run has (lora settings changed?); "
        "resume with the checkpoint's settings or start afresh (--no-resume)"
    )


def save(output_dir: str | os.PathLike, step: int, **kw: Any) -> Path:
    """Checkpoint `step`: `save_sharded` under torchrun (world size > 1), else
    `tvkd.checkpoint.save_checkpoint` (keywords: model, optimizer, scheduler, state, keep)."""
    if distributed.context().enabled:
        return save_sharded(output_dir, step, **kw)
    return ckpt_io.save_checkpoint(output_dir, step, **kw)


def restore_latest(
    output_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    config: dict[str, Any],
) -> tuple[Path, dict[str, Any], list[str]] | None:
    """`tvkd.checkpoint.restore_latest` for either format at any world size: (the newest
    complete checkpoint, its state, the settings of `config` that differ from its config), or
    None when there is none. A one-process checkpoint in one process loads as it always has."""
    ckpt = ckpt_io.latest_checkpoint(output_dir)
    if ckpt is None:
        return None
    kw = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "device": device}
    if is_sharded(ckpt) or distributed.context().enabled:
        state = load_any(ckpt, **kw)
    else:
        state = ckpt_io.load_checkpoint(ckpt, **kw)
    # How the run is spread over processes does not change its batches or schedule.
    layout = {"parallel", "fsdp_cpu_offload", "num_processes", "num_nodes"}
    changed = sorted(k for k, v in config.items() if state["config"].get(k, v) != v and k not in layout)
    return ckpt, state, changed


def save_model(
    parallel: Any,
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    lora: bool,
    rebuild: Callable[[], nn.Module],
) -> tuple[nn.Module, Path]:
    """`output_dir/model` (`tvkd.checkpoint.save_model_folder`) written by rank 0; a collective
    under torchrun. A DDP replica is the full model already; FSDP shards are gathered
    (`Parallel.full_state_dict`) into `rebuild()`, a fresh unsharded model (with LoRA adapters
    when the run has them), which rank 0 saves. Returns (the model saved, the folder)."""
    out = Path(output_dir) / "model"
    if parallel.mode == "fsdp":
        full = parallel.full_state_dict()
        if parallel.ctx.is_main:
            model = rebuild()
            model.load_state_dict(full)
    if parallel.ctx.is_main:
        model, out = ckpt_io.save_model_folder(model, tokenizer, output_dir, lora=lora)
    distributed.barrier()
    return model, out
