"""Supervised fine-tuning (SFT): a recipe of `SFTTrainer.setup()` → `train()` → `cleanup()`.

The paper's pipeline starts with SFT twice: the teacher's SFT model (then DPO-trained into the
teacher) and the student's initialisation. The loss is the mean negative log-likelihood of the
completion tokens (prompt tokens are context only, TRL's `completion_only_loss`):

    loss = −(1/N) Σ_{rows r} Σ_{t ∈ completion(r)} log π_θ(y_t | s_t)

with N the completion tokens of the whole optimizer step (all its micro-batches), so every token
weighs the same however the rows fall into micro-batches. The forward is the trainer's: the
decoder over the right-padded [B, L] rows, the LM head and float32 log-softmax only at the
positions that predict a completion token (`linear_logps`).

`SFTTrainer` is a `tvkd.trainer.Trainer` with its own data, step, evaluation and no reference
pass: checkpoints, exact resume (the data order is a function of (seed, step)), stop requests,
callbacks and progress, LoRA (merged into the saved model), bf16 autocast, activation
checkpointing, gradient accumulation and the warm-up + cosine schedule are the trainer's. The
examples come from `tvkd.completions` (prompt/completion rows, or preference rows' chosen
responses); a job of kind "sft" runs it (`tvkd.pipeline.train`, `tvkd sft`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tvkd.config import SFTConfig
from tvkd.data import PreferencePair, RowError
from tvkd.evaluate import EvalResult
from tvkd.logps import linear_logps, response_positions
from tvkd.modeling import decoder_hidden, output_head, pad_token_id
from tvkd.models import load_tokenizer
from tvkd.pairs import file_error
from tvkd.tokenize import tokenize_pair
from tvkd.trainer import Trainer
from tvkd.windows import effective_max_length


@dataclass
class CompletionRow:
    """One kept example, ready to batch: the student's token ids of prompt and completion."""

    index: int  # position in the examples
    row: int  # source row, for messages to the user
    prompt_ids: np.ndarray  # int64 [P]
    completion_ids: np.ndarray  # int64 [T], the end-of-response token included

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def build_rows(
    examples: Sequence[PreferencePair], indices: Sequence[int], *, tokenizer: Any, max_length: int
) -> tuple[list[CompletionRow], list[dict[str, Any]]]:
    """CompletionRows of `examples[i]` for i in `indices` (sorted), and those dropped with the
    reason (the tokenization of preference data: `tvkd.tokenize.tokenize_pair`)."""
    out: list[CompletionRow] = []
    dropped: list[dict[str, Any]] = []
    for i in sorted(set(indices)):
        example = examples[i]
        try:
            tp = tokenize_pair(tokenizer, example, max_length=max_length, index=i)
        except RowError as exc:
            dropped.append(
                {"index": i, "row": example.row, "code": exc.issue.code, "message": str(exc.issue)}
            )
            continue
        ids = np.asarray(tp.prompt_ids, np.int64), np.asarray(tp.chosen_ids, np.int64)
        out.append(CompletionRow(index=i, row=example.row, prompt_ids=ids[0], completion_ids=ids[1]))
    return out, dropped


@dataclass
class CompletionBatch:
    """B rows right-padded: prompt ⊕ completion ⊕ padding."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    prompt_lengths: Tensor  # [B]
    completion_lengths: Tensor  # [B]
    labels: Tensor  # [N] the completion tokens of every row back to back
    tokens: int  # real (unpadded) tokens


def collate_rows(
    rows: Sequence[CompletionRow], pad_id: int, device: torch.device | str = "cpu"
) -> CompletionBatch:
    """B rows → one right-padded batch on `device`; `pad_id` fills the padding (masked, never read)."""
    seqs = [np.concatenate([r.prompt_ids, r.completion_ids]) for r in rows]
    input_ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for k, seq in enumerate(seqs):
        input_ids[k, : len(seq)] = torch.from_numpy(seq)
        attention_mask[k, : len(seq)] = 1
    return CompletionBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        prompt_lengths=torch.tensor([len(r.prompt_ids) for r in rows], device=device),
        completion_lengths=torch.tensor([len(r.completion_ids) for r in rows], device=device),
        labels=torch.from_numpy(np.concatenate([r.completion_ids for r in rows])).to(device),
        tokens=sum(r.tokens for r in rows),
    )


def completion_logps(model: Any, batch: CompletionBatch, *, decoder: Any = None) -> Tensor:
    """log π_θ(y_t | s_t) of every completion token of the batch, float32 [N] (rows back to back).
    `decoder` replaces the model's decoder module (the trainer's torch.compile'd one)."""
    core, weight, bias = output_head(model)
    hidden = decoder_hidden(core if decoder is None else decoder, batch.input_ids, batch.attention_mask)
    positions = response_positions(batch.attention_mask, batch.prompt_lengths, batch.completion_lengths)
    return linear_logps(hidden[positions], weight, batch.labels, bias)


class SFTTrainer(Trainer):
    """Fine-tunes `student` on the completions of `examples[train_idx]`; evaluates the mean NLL on
    `examples[eval_idx]` (the module docstring gives the loss).

    Supported: what `Trainer` supports (full or LoRA, bf16, activation checkpointing, gradient
    accumulation, exact resume, one device), without a teacher.
    Assumed: a causal LM with a plain linear head (`tvkd.modeling.head_problem`), a fast tokenizer.
    Raises: `ValueError` when no training example is usable or a checkpoint does not fit;
    `tvkd.config.ConfigError` for a head that is not plain (or LoRA on it);
    `tvkd.models.ModelError` when the model folder cannot be loaded.
    Reports "loss" (mean NLL per completion token), "num_tokens" (completion tokens of the step),
    "grad_norm", "lr", "epoch"; held-out "loss" and "num_tokens".
    """

    config: SFTConfig

    def __init__(
        self,
        config: SFTConfig,
        *,
        student: str | os.PathLike,
        examples: Sequence[PreferencePair],
        train_idx: Sequence[int],
        eval_idx: Sequence[int],
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        callbacks: Any = None,
        resume: bool = False,
    ) -> None:
        super().__init__(
            config,  # type: ignore[arg-type]  # the trainer's machinery reads the shared fields
            student=student,
            teacher=None,
            pairs=examples,
            train_idx=train_idx,
            eval_idx=eval_idx,
            store=None,
            output_dir=output_dir,
            device=device,
            callbacks=callbacks,
            resume=resume,
        )

    def _check_inputs(self) -> None:
        if not isinstance(self.config, SFTConfig):
            raise TypeError(f"SFTTrainer takes an SFTConfig; got {type(self.config).__name__}")

    def _setup_data(self) -> None:
        self.tokenizer = load_tokenizer(self.student)
        self.same_tokenizer = None
        self.pad_id = pad_token_id(self.tokenizer)
        # Never past the model's window (tvkd.windows): longer rows are bad rows (too_long).
        self.length = effective_max_length(self.config.max_length, {"model": self.student})
        if self.length.note():
            self.cb.on_event("info", str(self.length.note()), {"max_length": self.length.max_length})
        kw = {"tokenizer": self.tokenizer, "max_length": self.length.max_length}
        self.train_set, dropped = build_rows(self.pairs, self.train_idx, **kw)  # type: ignore[assignment]
        self.eval_set, dropped_eval = build_rows(self.pairs, self.eval_idx, **kw)  # type: ignore[assignment]
        self.dropped = dropped + dropped_eval
        if self.dropped:
            rows = ", ".join(str(d["row"]) for d in self.dropped[:20])
            more = f" and {len(self.dropped) - 20} more" if len(self.dropped) > 20 else ""
            self.cb.on_event(
                "warning", f"dropped {len(self.dropped)} rows (rows {rows}{more})", {"dropped": self.dropped}
            )
        if not self.train_set:
            raise file_error(
                "training data",
                "no_usable_rows",
                f"no training row is usable ({len(self.dropped)} dropped; see the events)",
            )

    def _reference_pass(self) -> None:
        """SFT has no reference model."""
        self.reference_path = None

    def train_step(self, micro_batches: list[list[CompletionRow]]) -> dict[str, float]:  # type: ignore[override]
        """One optimizer step: the gradient of the mean NLL over every completion token of the step."""
        n_tokens = sum(len(r.completion_ids) for rows in micro_batches for r in rows)
        sums = {"nll": 0.0, "tokens": 0.0}
        mine = self.par.shard(micro_batches)  # under torchrun this rank's share (tvkd.parallel)
        for k, (rows, factor) in enumerate(mine):
            batch = collate_rows(rows, self.pad_id, self.device)
            with self.par.sync(last=k == len(mine) - 1):
                with self._autocast():
                    logps = self.par.forward(completion_logps, batch, decoder=self.step_decoder)
                loss = -logps.sum() / n_tokens
                (loss * factor if factor != 1.0 else loss).backward()
            if factor:
                sums["nll"] += float(loss.detach())
                sums["tokens"] += batch.tokens
        sums = self.par.sum(sums)
        nll = sums["nll"]
        self.tokens_seen += int(sums["tokens"])
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.par.clip_grad_norm(self.params, self.config.max_grad_norm or math.inf)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.cb.on_event("warning", f"non-finite gradient norm at step {self.step + 1}: step skipped")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        epoch = (self.step + 1) / self.steps_per_epoch
        return {"loss": nll, "num_tokens": float(n_tokens), "grad_norm": grad_norm, "lr": lr, "epoch": epoch}

    def mean_nll(self, rows: Sequence[CompletionRow]) -> tuple[float, int]:
        """(mean NLL per completion token, completion tokens) of `rows` under the current model."""
        cfg = self.config
        return mean_nll(
            self.model,
            rows,
            pad_id=self.pad_id,
            batch_size=cfg.batch_size,
            bf16=cfg.bf16,
            logps=lambda _, batch: self.par.forward(completion_logps, batch),  # every rank (FSDP)
        )

    def evaluate(self) -> dict[str, float]:
        """Held-out mean NLL per completion token (reported with split="eval")."""
        if not self.eval_set:
            return {}
        self.cb.on_stage("evaluate", {"rows": len(self.eval_set), "step": self.step})
        loss, count = self.mean_nll(self.eval_set)  # type: ignore[arg-type]
        metrics = {"loss": loss, "num_tokens": float(count)}
        self.history.append({"step": self.step, "split": "eval", **metrics})
        self.cb.on_metrics(self.step, metrics, "eval")
        return metrics


@torch.no_grad()
def mean_nll(
    model: Any,
    rows: Sequence[CompletionRow],
    *,
    pad_id: int,
    batch_size: int,
    bf16: bool = False,
    logps: Callable[[Any, CompletionBatch], Tensor] = completion_logps,
) -> tuple[float, int]:
    """(mean NLL per completion token, completion tokens) of `rows` under `model` (eval mode;
    NaN without rows). `logps(model, batch)`: `completion_logps`, or the trainer's forward
    through its DDP/FSDP wrapper (`tvkd.parallel.Parallel.forward`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for k in range(0, len(rows), batch_size):
            batch = collate_rows(rows[k : k + batch_size], pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = logps(model, batch)
            total -= float(out.double().sum())
            count += int(batch.labels.numel())
    finally:
        model.train(was_training)
    return (total / count if count else math.nan), count


def evaluate_saved(
    config: SFTConfig,
    *,
    student: str | os.PathLike,
    examples: Sequence[PreferencePair],
    eval_idx: Sequence[int],
    output_dir: str | os.PathLike,
    step: int,
    device: str | torch.device = "cpu",
    callbacks: Any = None,
) -> EvalResult:
    """The evaluate stage of an SFT job: the held-out mean NLL ("loss", "num_tokens"; reported
    with split "eval" at `step`) of the model folder `SFTTrainer` saved in `output_dir/model`,
    on the completions as training tokenized them (the student's tokenizer). No samples: the
    inspector's signals are the teacher's. Raises `tvkd.models.ModelError` when the folder
    cannot be loaded."""
    from tvkd.callbacks import Callbacks
    from tvkd.models import load_causal_lm

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(student))
    rows, dropped = build_rows(examples, eval_idx, tokenizer=tokenizer, max_length=config.max_length)
    metrics: dict[str, float] = {}
    if rows:
        cb.on_stage("evaluate", {"rows": len(rows), "step": step})
        model = load_causal_lm(str(Path(output_dir) / "model"), dtype=torch.float32, device=device)
        loss, count = mean_nll(
            model, rows, pad_id=pad_token_id(tokenizer), batch_size=config.batch_size, bf16=config.bf16
        )
        del model
        metrics = {"loss": loss, "num_tokens": float(count)}
        cb.on_metrics(step, metrics, "eval")
    return EvalResult(
        step=step,
        metrics=metrics,
        samples_path=None,
        eval_pairs=len(rows),
        dropped=dropped,
        seconds=time.perf_counter() - t0,
    )
