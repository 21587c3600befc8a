"""π_ref: the log-probabilities of the initial student, computed once per job and kept on disk.

MATH.md's reference policy is the student before training. Its log-probs of every response token
are constants of the loss, so one no-grad pass computes them for every kept pair and writes them
to `output_dir/reference.safetensors` (a ragged file, rows in pair order); training then runs one
model, not two. The pass batches each split as evaluation batches it (consecutive slices of
`batch_size` of the split, in pair order): other batch shapes give log-probs that differ in the
last bits (~5e-7), and before any update the held-out rewards must be exactly 0 (`rewards/margins`
0, `rewards/accuracies` 0) rather than that noise. A resumed run reuses the file when its
metadata (student and tokenizer fingerprints, the pairs, their token counts and batches, bf16)
matches, and recomputes it otherwise.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvkd import distributed
from tvkd.batch import TrainPair, collate, policy_logps
from tvkd.callbacks import Callbacks
from tvkd.fingerprints import model_fingerprint, tokenizer_fingerprint
from tvkd.ragged import RaggedFile, write_ragged

REFERENCE_FILE = "reference.safetensors"


def reference_metadata(
    pairs: Sequence[TrainPair], *, student: str, tokenizer: Any, bf16: bool, batches: str = ""
) -> dict[str, str]:
    """What decides the reference log-probs; a stored file is reused only when all of it matches.
    `pairs` sorted by index; `batches` describes how they were batched."""
    layout = [[p.index, len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    return {
        "batches": batches,
        "student_fingerprint": model_fingerprint(student),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "pairs": str(len(pairs)),
        "layout": hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest(),
        "bf16": str(bf16),
    }


def _reuse(path: Path, pairs: Sequence[TrainPair], meta: dict[str, str]) -> bool:
    ref = RaggedFile(path)
    if any(ref.metadata.get(k) != v for k, v in meta.items()):
        return False
    for r, p in enumerate(pairs):
        p.ref_chosen, p.ref_rejected = np.array(ref.row("chosen", r)), np.array(ref.row("rejected", r))
    return True


@torch.no_grad()
def reference_logps(
    model: Any,
    splits: Sequence[Sequence[TrainPair]],
    path: Path,
    *,
    student: str,
    tokenizer: Any,
    reuse: bool,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    callbacks: Callbacks,
) -> Path | None:
    """Fill `ref_chosen`/`ref_rejected` of every pair of `splits` (e.g. [train pairs, eval pairs],
    each in the order evaluation reads it) with log π_ref [T] float32 (one no-grad pass of
    `model`, the student folder `student` as loaded, in eval mode; each split batched
    `batch_size` at a time on its own, as `tvkd.evaluate.evaluate_pairs` batches it) and write them
    to `path`; with `reuse`, read a matching file instead. Returns None when
    `callbacks.should_stop()` interrupts the pass (nothing is written)."""
    cb = callbacks
    batches = [list(split[k : k + batch_size]) for split in splits for k in range(0, len(split), batch_size)]
    pairs = sorted((p for split in splits for p in split), key=lambda p: p.index)
    shape = json.dumps([[p.index for p in b] for b in batches])
    meta = reference_metadata(
        pairs,
        student=student,
        tokenizer=tokenizer,
        bf16=bf16,
        batches=hashlib.sha256(shape.encode()).hexdigest(),
    )
    if reuse and path.is_file():
        if _reuse(path, pairs, meta):
            cb.on_event("info", f"reusing reference log-probs {path}")
            return path
        cb.on_event("warning", f"{path} was made for another student or pairs: recomputing")
    cb.on_stage("reference", {"pairs": len(pairs)})
    model.eval()
    t0 = time.perf_counter()
    done = 0
    ctx = distributed.context()  # under torchrun rank r computes batches r, r+N, ... (same batches)
    for start in range(0, len(batches), ctx.world_size):
        if distributed.any_flag(cb.should_stop()):
            return None
        if start + ctx.rank >= len(batches):
            continue
        group = batches[start + ctx.rank]
        batch = collate(group, pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            chosen, rejected = policy_logps(model, batch)
        chosen, rejected = chosen.float().cpu().numpy(), rejected.float().cpu().numpy()
        for j, p in enumerate(batch.pairs):
            p.ref_chosen = chosen[j, : len(p.chosen_ids)].copy()
            p.ref_rejected = rejected[j, : len(p.rejected_ids)].copy()
        done += len(group) * ctx.world_size  # an estimate from this rank's share
        cb.on_progress("reference", min(done, len(pairs)), len(pairs), _eta(t0, done, len(pairs)))
    _gather(pairs, ctx.world_size)
    if ctx.is_main:
        write_ragged(
            path,
            {"chosen": [p.ref_chosen for p in pairs], "rejected": [p.ref_rejected for p in pairs]},
            metadata={**meta, "indices": json.dumps([p.index for p in pairs])},
        )
    distributed.barrier()
    return path


def _eta(t0: float, done: int, total: int) -> float:
    return (time.perf_counter() - t0) / done * max(0, total - done)


def _gather(pairs: Sequence[TrainPair], world: int) -> None:
    """Every rank's rows into every rank's pairs (all-gather; a no-op in one process)."""
    if world <= 1:
        return
    import torch.distributed as dist

    mine = {p.index: (p.ref_chosen, p.ref_rejected) for p in pairs if p.ref_chosen is not None}
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, mine)
    rows = {i: row for part in parts for i, row in (part or {}).items()}
    for p in pairs:
        p.ref_chosen, p.ref_rejected = rows[p.index]


def load_reference(
    path: Path, pairs: Sequence[TrainPair], *, student: str, tokenizer: Any, bf16: bool
) -> None:
    """Fill `ref_chosen`/`ref_rejected` of `pairs` (any subset of the pairs the file was written
    for) from the file `reference_logps` wrote during training.

    Raises ValueError when the file is missing or was made for another student, tokenizer, bf16
    setting or tokenization of these pairs (the evaluate stage then cannot score the student
    against the π_ref it was trained with).
    """
    if not path.is_file():
        raise ValueError(f"{path}: no reference log-probs (the train stage writes them); train again")
    ref = RaggedFile(path)
    want = {
        "student_fingerprint": model_fingerprint(student),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "bf16": str(bf16),
    }
    changed = sorted(k for k, v in want.items() if ref.metadata.get(k) != v)
    rows = {int(i): r for r, i in enumerate(json.loads(ref.metadata.get("indices", "[]")))}
    missing = [p.index for p in pairs if p.index not in rows]
    if changed or missing:
        why = f"its {', '.join(changed)} differ" if changed else f"it has no row for pairs {missing[:10]}"
        raise ValueError(f"{path} was made for another training run ({why}); train again")
    for p in pairs:
        chosen, rejected = ref.row("chosen", rows[p.index]), ref.row("rejected", rows[p.index])
        if (len(chosen), len(rejected)) != (len(p.chosen_ids), len(p.rejected_ids)):
            raise ValueError(f"{path}: pair {p.index} (row {p.row}) was tokenized differently; train again")
        p.ref_chosen, p.ref_rejected = np.array(chosen), np.array(rejected)
