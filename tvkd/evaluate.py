"""Held-out evaluation of a student: the MATH.md metrics over every held-out pair, and the
evaluate stage that scores the trained student from its saved folder.

`evaluate` averages the metrics over every pair of its batches: the per-pair terms of all
batches are concatenated before the means are taken, so a short last batch weighs what it holds
(not the mean of batch means). The trainer calls it every `eval_every` steps on the model in
memory.

`Evaluator` is the evaluate stage (a recipe like `tvkd.trainer.Trainer`: `setup()` → `run()` →
`cleanup()`): it loads the model folder the train stage saved, rebuilds the held-out pairs as
training built them (the student's tokenizer, the teacher's values, the π_ref log-probs the
reference pass stored), and writes the held-out metrics (reported with split "eval") and
`samples.json` (`tvkd.samples.write_samples`).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tvkd.alignment import check_store, load_tokenizers
from tvkd.answers import GENERATIONS_FILE, GenerationsFile
from tvkd.artifacts import SAMPLES_FILE
from tvkd.batch import Batch, TrainPair, build_train_pairs, collate, policy_logps
from tvkd.callbacks import Callbacks
from tvkd.config import TrainConfig
from tvkd.data import PreferencePair
from tvkd.generation import GenerationOptions, evaluate_generation
from tvkd.losses import PairTerms, loss_and_metrics, loss_options, pair_terms
from tvkd.modeling import disable_dropout, pad_token_id
from tvkd.models import load_causal_lm
from tvkd.reference import REFERENCE_FILE, load_reference
from tvkd.samples import write_samples
from tvkd.stage_results import EvalResult
from tvkd.store import ValueStore
from tvkd.windows import effective_max_length

MODEL_DIR = "model"  # the folder the train stage saves under output_dir


@torch.no_grad()
def evaluate(
    model: Any,
    batches: Iterable[Batch],
    loss_options: Mapping[str, Any],
    *,
    bf16: bool = False,
    logps: Callable[[Any, Batch], tuple[Tensor, Tensor]] = policy_logps,
) -> dict[str, float]:
    """The MATH.md metrics (and "loss") over every pair of `batches`, plus "pairs" (their count).

    `loss_options` are the keyword options of `tvkd_loss` (see `tvkd.losses.loss_options`);
    `logps(model, batch)` gives the log-probs (`policy_logps`, or the trainer's forward through
    its DDP/FSDP wrapper under torchrun, `tvkd.parallel.Parallel.forward`).
    """
    opts = dict(loss_options)
    alpha, beta, sft_weight = opts.pop("alpha"), opts.pop("beta"), opts.pop("sft_weight", 0.0)
    was_training = model.training
    model.eval()
    parts: list[PairTerms] = []
    try:
        for batch in batches:
            device = batch.input_ids.device
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                chosen, rejected = logps(model, batch)
            parts.append(
                pair_terms(
                    chosen,
                    rejected,
                    *batch.split(batch.ref_logps),
                    *batch.split(batch.values),
                    *batch.split(batch.response_mask),
                    **batch.teacher,
                    **opts,
                )
            )
    finally:
        model.train(was_training)
    if not parts:
        return {}
    terms = PairTerms(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(PairTerms)})
    _, metrics = loss_and_metrics(terms, alpha=alpha, beta=beta, sft_weight=sft_weight)
    metrics["pairs"] = float(terms.logps_chosen.shape[0])
    return metrics


def evaluate_pairs(
    model: Any,
    pairs: Sequence[TrainPair],
    loss_options: Mapping[str, Any],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    *,
    bf16: bool = False,
    logps: Callable[[Any, Batch], tuple[Tensor, Tensor]] = policy_logps,
) -> dict[str, float]:
    """`evaluate` over `pairs` collated `batch_size` at a time on `device`."""
    batches = (collate(pairs[k : k + batch_size], pad_id, device) for k in range(0, len(pairs), batch_size))
    return evaluate(model, batches, loss_options, bf16=bf16, logps=logps)


class Evaluator:
    """Scores the student saved in `output_dir/model` on `pairs[eval_idx]` (the evaluate stage).

    Supported: what `Trainer` supports (the same pairs, tokenizer, values and options; a LoRA run
    is scored on its merged model folder), one device.
    Assumed: `output_dir` is the folder a completed `Trainer.train` wrote (the model folder and
    `reference.safetensors`), `store` the value store it trained with (None when the method uses
    no teacher), `step` the step it stopped at.
    With `generation` enabled it also answers held-out prompts before and after training
    (`tvkd.generation`; `records`: each held-out pair's source row, by pair index, where a row
    declares its gold checker).
    Raises: `tvkd.models.ModelError` when the model folder (or a scorer's) cannot be loaded;
    `ValueError` when the reference log-probs are missing or were made for another run;
    `ConfigError` as `Trainer.setup`.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        student: str | os.PathLike,
        teacher: str | os.PathLike | None,
        pairs: Sequence[PreferencePair],
        eval_idx: Sequence[int],
        store: ValueStore | None,
        output_dir: str | os.PathLike,
        step: int,
        device: str | torch.device = "cpu",
        callbacks: Callbacks | None = None,
        generation: GenerationOptions | None = None,
        records: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.generation = generation or GenerationOptions()
        self.records = dict(records or {})
        self.student, self.teacher = str(student), (str(teacher) if teacher is not None else None)
        self.pairs, self.eval_idx, self.store = pairs, list(eval_idx), store
        self.output_dir = Path(output_dir)
        self.step = step
        self.device = torch.device(device)
        self.cb = callbacks or Callbacks()

    def setup(self) -> None:
        """The held-out pairs as training built them (π_ref from the stored file), and the model."""
        cfg = self.config
        check_store(cfg.method, self.store, self.teacher)
        toks = load_tokenizers(
            cfg.method, self.pairs, student=self.student, teacher=self.teacher, store=self.store
        )
        self.tokenizer, self.same_tokenizer = toks.student, toks.same
        self.loss_options = loss_options(cfg.method, shaping=None if self.store is not None else "none")
        self.pad_id = pad_token_id(self.tokenizer)
        # The pairs as the trainer built them: the same window and truncation.
        teacher = self.teacher if self.store is not None else None
        length = effective_max_length(cfg.max_length, {"student": self.student, "teacher": teacher})
        kw = toks.pair_options(length.max_length, self.store, truncation_mode=cfg.truncation_mode)
        self.eval_set, self.dropped = build_train_pairs(self.pairs, self.eval_idx, **kw)
        if self.eval_set:
            load_reference(
                self.output_dir / REFERENCE_FILE,
                self.eval_set,
                student=self.student,
                tokenizer=self.tokenizer,
                bf16=cfg.bf16,
            )
        self.model = load_causal_lm(str(self.output_dir / MODEL_DIR), dtype=torch.float32, device=self.device)
        disable_dropout(self.model)
        self.model.eval()

    def run(self) -> EvalResult:
        """Held-out metrics (reported with split "eval" at `step`) and samples.json."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        samples: Path | None = None
        cfg = self.config
        if self.eval_set:
            self.cb.on_stage("evaluate", {"pairs": len(self.eval_set), "step": self.step})
            metrics = evaluate_pairs(
                self.model,
                self.eval_set,
                self.loss_options,
                cfg.batch_size,
                self.pad_id,
                self.device,
                bf16=cfg.bf16,
            )
            samples = self.write_samples()
        before, generations = {}, None
        if self.generation.enabled and self.eval_set:
            doc = self.generate()
            before, generations = doc.before, self.output_dir / GENERATIONS_FILE
            if before:
                self.cb.on_metrics(0, before, "eval")  # the untrained student
            metrics = {**metrics, **doc.after}
        if metrics:
            self.cb.on_metrics(self.step, metrics, "eval")
        return EvalResult(
            step=self.step,
            metrics=metrics,
            samples_path=str(samples) if samples else None,
            eval_pairs=len(self.eval_set),
            dropped=self.dropped,
            seconds=time.perf_counter() - t0,
            generations_path=str(generations) if generations else None,
            before_metrics=before,
        )

    def generate(self) -> GenerationsFile:
        """generations.json: greedy answers before and after training, scored."""
        options = self.generation
        self.cb.on_stage("generate", {"prompts": min(options.prompts, len(self.eval_set))})

        def untrained() -> Any:
            return load_causal_lm(self.student, dtype=torch.float32, device=self.device)

        return evaluate_generation(
            self.output_dir,
            options=options,
            after_model=self.model,
            before_model=untrained,
            tokenizer=self.tokenizer,
            held_out=self.eval_set,
            pairs=self.pairs,
            records=self.records,
            step=self.step,
            device=self.device,
        )

    def write_samples(self) -> Path | None:
        """samples.json: per-token signals of the first `num_samples` held-out pairs."""
        pairs = self.eval_set[: self.config.num_samples]
        if not pairs:
            return None
        self.cb.on_stage("samples", {"pairs": len(pairs)})
        return write_samples(
            self.output_dir / SAMPLES_FILE,
            model=self.model,
            tokenizer=self.tokenizer,
            train_pairs=pairs,
            pairs=self.pairs,
            loss_options=self.loss_options,
            teacher=self.teacher if self.store is not None else None,
            same_tokenizer=bool(self.same_tokenizer),
            teacher_max_length=int(self.store.fields["max_length"]) if self.store is not None else None,
            device=self.device,
            bf16=self.config.bf16,
            step=self.step,
        )

    def cleanup(self) -> None:
        """Drop the model (a worker process runs many jobs one after another)."""
        if hasattr(self, "model"):
            del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
