"""Checkpoints of a training run and the random state that makes a resume exact.

`output_dir/checkpoints/step-NNNNNN/` holds the trainable weights (`model.safetensors`), the
optimizer and scheduler state, the Python/NumPy/torch (and CUDA) RNG states and `state.json`
(the step, the config, the unreported metric window, ...). A checkpoint is written into a
temporary folder and renamed into place, and `state.json` is written last, so a folder without
it is never read back (`list_checkpoints`); only the newest `keep` are kept. The final model
folder is written the same way (`save_model_folder`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state, for `set_rng_state`."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (state.json is written last), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of checkpoint `step` (whether or not it exists)."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` (trainable weights, optimizer, scheduler, RNG, then `state`) and
    delete all but the newest `keep` checkpoints. Returns its folder."""
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    commit_checkpoint(tmp, final, scheduler=scheduler, state=state, keep=keep)
    return final


def commit_checkpoint(tmp: Path, final: Path, *, scheduler: Any, state: dict[str, Any], keep: int) -> None:
    """Finish a checkpoint written into `tmp` (weights and optimizer already there, in either
    format: this module's or `tvkd.dcp`'s): add the scheduler, the RNG state and, last, `state`
    (its presence marks a complete checkpoint); rename it to `final`; delete all but the newest
    `keep` checkpoints of `final`'s output folder."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: marks it complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    ckpt: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; returns its `state.json`.

    Raises ValueError when the checkpoint holds other trainable parameters than `model` has.
    """
    state = json.loads((ckpt / STATE_FILE).read_text())
    tensors = load_file(ckpt / "model.safetensors", device=str(device))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(named):
        raise ValueError(
            f"{ckpt} holds other trainable parameters than this run has (lora settings changed?); "
            "resume with the checkpoint's settings or start afresh (--no-resume)"
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt"))
    # Our own file (python/numpy RNG states are not tensors, so not weights-only loadable).
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    return state


def restore_latest(
    output_dir: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    config: dict[str, Any],
) -> tuple[Path, dict[str, Any], list[str]] | None:
    """`load_checkpoint` of the newest complete checkpoint: (its folder, its state, the settings of
    `config` that differ from the checkpoint's), or None when there is none."""
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return None
    state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, device=device)
    changed = sorted(k for k, v in config.items() if state["config"].get(k) != v)
    return ckpt, state, changed


def save_model_folder(
    model: Any, tokenizer: Any, output_dir: str | os.PathLike, *, lora: bool
) -> tuple[Any, Path]:
    """Write `output_dir/model`, a plain Hugging Face folder (safetensors + tokenizer), through a
    temporary folder renamed into place. With `lora`, the adapter alone also goes to
    `output_dir/adapter` (for peft users) and the model saved is the merged one, which is
    returned with the folder (the peft wrapper is unusable after merging)."""
    output_dir = Path(output_dir)
    out, tmp = output_dir / "model", output_dir / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        model.save_pretrained(output_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return model, out
