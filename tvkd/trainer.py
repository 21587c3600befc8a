"""TVKD training of a student: a recipe of `Trainer.setup()` → `train()` → `cleanup()`.

The whole method fits in one step (`Trainer.train_step`): a batch of B pairs is one [2B, L]
forward through the student's decoder (chosen rows, then rejected rows, right-padded); only the
positions that predict a response token reach the LM head, through `linear_logps` (chunked
head + float32 log-softmax, never full logits); the per-token log-probs are scattered back to
[B, T] per side and go into `tvkd_loss` with the precomputed reference log-probs and teacher
values. Around it: `tvkd.alignment` (can the teacher's signals be put on the student's tokens),
`tvkd.batch` (pairs → `TrainPair`s → `Batch`, the data order, the fused forward),
`tvkd.reference` (π_ref, one no-grad pass of the initial student per job), `tvkd.optim` and
`tvkd.checkpoint` (checkpoints, RNG state, the final model folder). A resumed run sees exactly
the batches of the uninterrupted one. Training ends with the model saved: a plain Hugging Face
folder (`output_dir/model`), LoRA adapters merged into it; the final held-out evaluation and
samples.json are the evaluate stage's (`tvkd.evaluate.Evaluator`, from that folder).
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tvkd import checkpoint as ckpt_io
from tvkd import distributed as dist_ctx
from tvkd import run_state
from tvkd.alignment import check_store, load_tokenizers
from tvkd.batch import (
    TrainPair,
    build_train_pairs,
    collate,
    dropped_message,
    policy_logps,
    step_order,
    steps_per_epoch,
)
from tvkd.callbacks import Callbacks
from tvkd.config import TrainConfig
from tvkd.data import PreferencePair
from tvkd.evaluate import evaluate_pairs
from tvkd.losses import loss_options, tvkd_loss
from tvkd.modeling import add_lora, check_trainable_head, disable_dropout, output_head, pad_token_id
from tvkd.modeling import set_activation_checkpointing as set_checkpointing
from tvkd.models import load_causal_lm
from tvkd.optim import adamw, warmup_cosine
from tvkd.pairs import file_error
from tvkd.parallel import Parallel, rank_callbacks
from tvkd.reference import REFERENCE_FILE, reference_logps
from tvkd.stage_results import TrainResult
from tvkd.store import ValueStore
from tvkd.windows import effective_max_length

CHECKPOINTS = ckpt_io.CHECKPOINTS


class Trainer:
    """Trains `student` on `pairs[train_idx]` with TVKD (MATH.md "Loss"); every `eval_every` steps
    it reports the held-out metrics of `pairs[eval_idx]`.

    `pairs` is the full list the value store is indexed by. `store` is None when the method does
    not use the teacher (alpha == 0 or shaping == "none"); `teacher` (the folder) is then unused.

    Supported:
        full fine-tuning or LoRA (peft; merged into the saved model), bf16 autocast, activation
        checkpointing, gradient accumulation, warm-up + cosine schedule, AdamW (no decay on
        norms and biases), resume from the newest checkpoint with the same data order, teacher
        and student with different tokenizers (values mapped onto the student's boundaries),
        one device, or N processes under torchrun (DDP or FSDP2: `tvkd.parallel`, `tvkd.dcp`).
    Assumed:
        a causal LM whose logits are its decoder's hidden states × a plain `nn.Linear` head
        (`tvkd.modeling.head_problem`); a fast tokenizer; a value store computed from these
        pairs, in this order, by this teacher with the method's `q_source`/`value_beta`
        (`check_alignment` verifies it).
    Raises:
        `ConfigError` (a setting to change, named) from `setup` when the method needs a store it
        was not given, the teacher cannot be aligned with the student, or the head is not plain;
        `ValueError` when no training pair is usable or a checkpoint does not fit the model;
        `tvkd.numerics.NonFiniteError` from `train` when too many steps have a non-finite
        gradient (`max_skipped_steps`, `max_skipped_fraction`), from `setup` when the store
        holds NaN/Inf;
        `tvkd.models.ModelError` when a model folder cannot be loaded.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        student: str | os.PathLike,
        teacher: str | os.PathLike | None,
        pairs: Sequence[PreferencePair],
        train_idx: Sequence[int],
        eval_idx: Sequence[int],
        store: ValueStore | None,
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        callbacks: Callbacks | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.student, self.teacher = str(student), (str(teacher) if teacher is not None else None)
        self.pairs, self.train_idx, self.eval_idx = pairs, list(train_idx), list(eval_idx)
        self.store = store
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.cb = callbacks or Callbacks()
        self.resume = resume
        self.step = 0
        self.stopped = False
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.reference_path: Path | None = None
        self.step_decoder: Any = None  # torch.compile'd decoder (torch_compile=True), set by setup
        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        # Metrics of the steps since the last report. A checkpoint carries them, so that a resumed
        # run reports exactly what the uninterrupted one would have (log_every > 1).
        self.window: list[dict[str, float]] = []
        self.tokens_seen = 0
        # Optimizer steps skipped for a non-finite gradient norm; a checkpoint carries both counts,
        # so that a resumed run counts the skips before it against max_skipped_*.
        self.skipped_steps = 0
        self.skipped_in_a_row = 0

    # ---------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Check, tokenize, load the student, compute π_ref, build the optimizer (and resume)."""
        self._check_inputs()
        if not self.train_idx:
            raise ValueError("no training pairs")
        self.cb.on_stage(
            "setup",
            {"student": self.student, "train_pairs": len(self.train_idx), "eval_pairs": len(self.eval_idx)},
        )
        ckpt_io.seed_everything(self.config.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.config  # under torchrun: the process group, and rank 0 alone reports
        self.par = Parallel(cfg.parallel, cpu_offload=cfg.fsdp_cpu_offload, bf16=cfg.bf16)
        self.cb = rank_callbacks(self.cb)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        if self.resume:
            self._restore_latest()

    def _check_inputs(self) -> None:
        check_store(self.config.method, self.store, self.teacher)

    def _setup_data(self) -> None:
        cfg, method = self.config, self.config.method
        toks = load_tokenizers(
            method, self.pairs, student=self.student, teacher=self.teacher, store=self.store
        )
        self.tokenizer, self.same_tokenizer = toks.student, toks.same
        # Without a store ψ ≡ 0: 'none' keeps tvkd_loss from asking for teacher token stats.
        self.loss_options = loss_options(method, shaping=None if self.store is not None else "none")
        self.pad_id = pad_token_id(self.tokenizer)
        # Never past a model's window: the student's, and the teacher's the store was made with.
        teacher = self.teacher if self.store is not None else None
        self.length = effective_max_length(cfg.max_length, {"student": self.student, "teacher": teacher})
        if self.length.note():
            self.cb.on_event("info", str(self.length.note()), {"max_length": self.length.max_length})
        kw = toks.pair_options(self.length.max_length, self.store, truncation_mode=cfg.truncation_mode)
        self.train_set, dropped = build_train_pairs(self.pairs, self.train_idx, **kw)
        self.eval_set, dropped_eval = build_train_pairs(self.pairs, self.eval_idx, **kw)
        self.dropped = dropped + dropped_eval
        if self.dropped:
            self.cb.on_event("warning", dropped_message(self.dropped), {"dropped": self.dropped})
        if self.eval_idx and not self.eval_set:
            self.cb.on_event(
                "warning",
                f"all {len(self.eval_idx)} held-out pairs were dropped: this run has no held-out metrics "
                "(fix or remove those rows, or give --eval-dataset)",
                {"held_out": len(self.eval_idx), "held_out_kept": 0},
            )
        if not self.train_set:
            raise file_error(
                "training data",
                "no_usable_pairs",
                f"no training pair is usable ({len(self.dropped)} dropped; see the events)",
            )

    def _setup_model(self) -> None:
        cfg = self.config
        self.model = load_causal_lm(self.student, dtype=torch.float32, device=self.device)
        disable_dropout(self.model)
        check_trainable_head(self.model)
        checkpoints = self.output_dir / CHECKPOINTS
        if not self.resume and checkpoints.exists() and self.par.ctx.is_main:
            self.cb.on_event("info", f"fresh start: removing old checkpoints in {checkpoints}")
            shutil.rmtree(checkpoints)
        dist_ctx.barrier()
        self._reference_pass()  # before LoRA: π_ref is the initial student
        if cfg.lora:
            self.model = add_lora(self.model, cfg)
            check_trainable_head(self.model)
        if cfg.gradient_checkpointing:
            set_checkpointing(self.model, True)
        # torch.compile of the decoder for the training step: a wrapper sharing the module's
        # weights (checkpoints and the saved model are the plain module's); shapes vary by batch.
        # (SFTConfig has no such lever: its step is its own.)
        compile_step = getattr(cfg, "torch_compile", False)
        self.step_decoder = torch.compile(output_head(self.model)[0], dynamic=True) if compile_step else None
        self.model.train()
        self.par.wrap(self.model, self.device)  # DDP / FSDP2 under torchrun (tvkd.parallel)

    def _reference_pass(self) -> None:
        """log π_ref of every pair (stored in the pairs); a stop request during it stops the run."""
        cfg = self.config
        self.reference_path = reference_logps(
            self.model,
            [self.train_set, self.eval_set],  # the eval pairs batched as `evaluate` batches them
            self.output_dir / REFERENCE_FILE,
            student=self.student,
            tokenizer=self.tokenizer,
            reuse=self.resume,
            batch_size=cfg.batch_size,
            pad_id=self.pad_id,
            device=self.device,
            bf16=cfg.bf16,
            callbacks=self.cb,
        )
        self.stopped = self.reference_path is None

    def _setup_optimizer(self) -> None:
        cfg = self.config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, cfg, self.device)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg.batch_size, cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    # ---------------------------------------------------------------------------- train

    def step_batches(self, step: int) -> list[list[TrainPair]]:
        """The micro-batches of optimizer step `step`, a function of (seed, step) only."""
        cfg = self.config
        order = step_order(len(self.train_set), step, cfg.seed, cfg.batch_size, cfg.grad_accum)
        return [[self.train_set[i] for i in micro] for micro in order]

    def _logps(self, model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return policy_logps(model, batch, packed=self.config.padding_free, decoder=self.step_decoder)

    def train_step(self, micro_batches: list[list[TrainPair]]) -> dict[str, float]:
        """One optimizer step over the micro-batches (under torchrun this rank's share of them,
        `Parallel.shard`); returns its metrics (pair-weighted means over every rank's pairs)."""
        n_pairs = sum(len(mb) for mb in micro_batches)
        sums: dict[str, float] = {"tokens": 0.0}  # metric·pairs, "n/<metric>": pairs behind it
        mine = self.par.shard(micro_batches)
        for k, (examples, factor) in enumerate(mine):
            batch = collate(examples, self.pad_id, self.device)
            with self.par.sync(last=k == len(mine) - 1):
                with self._autocast():  # one decoder pass, [2B, L] (or packed: [1, tokens])
                    chosen, rejected = self.par.forward(self._logps, batch)
                loss, batch_metrics = tvkd_loss(
                    chosen,
                    rejected,
                    *batch.split(batch.ref_logps),
                    *batch.split(batch.values),
                    *batch.split(batch.response_mask),
                    **batch.teacher,
                    **self.loss_options,
                )
                # Weighted by pairs: the step's gradient is that of the mean loss over all its
                # pairs, even when the last micro-batch of an epoch is short (factor: see Parallel).
                (loss * (batch.size * factor / n_pairs)).backward()
            if factor:
                for name, value in batch_metrics.items():
                    sums[name] = sums.get(name, 0.0) + value * batch.size
                    sums["n/" + name] = sums.get("n/" + name, 0.0) + batch.size
                sums["tokens"] += batch.tokens
        sums = self.par.sum(sums)
        self.tokens_seen += int(sums.pop("tokens"))
        lr = self.scheduler.get_last_lr()[0]
        # max_grad_norm = 0 turns clipping off; the norm is still reported.
        grad_norm = self.par.clip_grad_norm(self.params, self.config.max_grad_norm or math.inf)
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:  # one bad batch must not turn every weight into NaN
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            self.cb.on_event("warning", f"non-finite gradient norm at step {self.step + 1}: step skipped")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: v / sums["n/" + k] for k, v in sums.items() if not k.startswith("n/")}
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "epoch": (self.step + 1) / self.steps_per_epoch}

    def train(self) -> TrainResult:
        cfg, cb = self.config, self.cb
        start_step, t0, tokens0 = self.step, time.perf_counter(), self.tokens_seen
        cb.on_stage(
            "train",
            {
                "steps": self.total_steps,
                "start_step": self.step,
                "train_pairs": len(self.train_set),
                "eval_pairs": len(self.eval_set),
            },
        )
        while not self.stopped and self.step < self.total_steps:
            if self.par.should_stop(cb):  # rank 0's request stops every rank here
                self.stopped = True
                break
            self.window.append(self.train_step(self.step_batches(self.step)))
            self.step += 1
            self._check_skipped()
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._report()
            eta = (time.perf_counter() - t0) / (self.step - start_step) * (self.total_steps - self.step)
            cb.on_progress("train", self.step, self.total_steps, eta)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        seconds = time.perf_counter() - t0
        tps = (self.tokens_seen - tokens0) / seconds if seconds > 0 else 0.0
        if self.stopped:
            checkpoint = self.save_checkpoint() if self.step > 0 else None
            cb.on_event(
                "info",
                f"stopped at step {self.step} of {self.total_steps}",
                {"step": self.step, "checkpoint": str(checkpoint) if checkpoint else None},
            )
            return self._result("stopped", seconds, tps, model_dir=None)
        self.save_checkpoint()
        model_dir = self.save_model()
        return self._result("completed", seconds, tps, model_dir)

    def _check_skipped(self) -> None:
        """Raise `run_state.skipped_error` once too many steps were skipped (non-finite norm)."""
        error = run_state.skipped_error(self)
        if error is not None:
            raise error

    def _report(self) -> None:
        """Report the mean of the steps since the last report (`run_state.window_mean`)."""
        window, self.window = self.window, []
        self.last_metrics = metrics = run_state.window_mean(window)
        self.history.append({"step": self.step, "split": "train", **metrics})
        self.cb.on_metrics(self.step, metrics, "train")

    def _result(self, status: str, seconds: float, tps: float, model_dir: Path | None) -> TrainResult:
        return run_state.train_result(self, status, seconds, tps, model_dir)

    # ---------------------------------------------------------------------------- evaluate

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the model in memory over every eval pair (reported with
        split="eval"); every `eval_every` steps. The final evaluation is the evaluate stage's
        (`tvkd.evaluate.Evaluator`, from the saved model folder)."""
        if not self.eval_set:
            return {}
        self.cb.on_stage("evaluate", {"pairs": len(self.eval_set), "step": self.step})
        cfg = self.config
        metrics = evaluate_pairs(
            self.model,
            self.eval_set,
            self.loss_options,
            cfg.batch_size,
            self.pad_id,
            self.device,
            bf16=cfg.bf16,
            logps=lambda _, batch: self.par.forward(policy_logps, batch),  # every rank (FSDP)
        )
        self.history.append({"step": self.step, "split": "eval", **metrics})
        self.cb.on_metrics(self.step, metrics, "eval")
        return metrics

    # ---------------------------------------------------------------------------- save

    def _restore_latest(self) -> None:
        run_state.restore_latest(self)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN/ (`tvkd.checkpoint`, or `tvkd.dcp` under torchrun)."""
        return run_state.save_checkpoint(self)

    def save_model(self) -> Path:
        """output_dir/model: a plain HF folder (safetensors + tokenizer); LoRA merged into it."""
        return run_state.save_model(self)

    # ---------------------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """Drop the model and optimizer (a worker process runs many jobs one after another)."""
        for name in ("model", "optimizer", "scheduler", "params"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
