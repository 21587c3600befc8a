"""TVKD training of a student: `Trainer.setup()` → `train()` → `cleanup()`.

The whole method fits in one step (`Trainer.train_step`): a batch of B pairs is one [2B, L]
forward through the student's decoder (chosen rows, then rejected rows, right-padded); only the
positions that predict a response token reach the LM head, through `linear_logps` (chunked
head + float32 log-softmax, never full logits); the per-token log-probs are scattered back to
[B, T] per side and go into `tvkd_loss` with the precomputed reference log-probs and teacher
values. Everything else here is bookkeeping around that step:

- setup: tokenize with the student's tokenizer, put the teacher's values on the student's token
  boundaries (identity for a shared tokenizer, `map_boundary_values` otherwise), and fail early
  when that is impossible (`check_alignment`); π_ref log-probs are computed once per job by a
  no-grad pass of the initial student and kept in `reference.safetensors` (MATH.md: training
  then runs one model, not two);
- data order is a function of (seed, step) only, so a resumed run sees exactly the batches the
  uninterrupted run would have; checkpoints hold trainable weights, optimizer, scheduler and RNG
  state, written to a temporary folder and renamed;
- the output is a plain Hugging Face folder (`output_dir/model`), LoRA adapters merged into it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tvkd.callbacks import Callbacks
from tvkd.config import ConfigError, MethodConfig, TrainConfig
from tvkd.data import PreferencePair, RowError, dataset_fingerprint
from tvkd.logps import linear_logps, response_positions
from tvkd.losses import tvkd_loss
from tvkd.models import load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint
from tvkd.ragged import RaggedFile, write_ragged
from tvkd.store import ValueStore
from tvkd.tokenize import needs_chat_template, tokenize_pair
from tvkd.values import map_boundary_values

ACTION_SHAPINGS = ("logprob", "logit")  # ψ needs the teacher's score of each student token
REFERENCE_FILE = "reference.safetensors"
CHECKPOINTS = "checkpoints"
# Config attributes of output heads that are not a plain linear layer: linear_logps would
# silently compute other log-probs than the model's own.
_UNSUPPORTED_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


# --------------------------------------------------------------------------------------------
# Can the teacher's signals be put on the student's tokens?


def check_alignment(
    method: MethodConfig,
    pairs: Sequence[PreferencePair],
    *,
    student_tokenizer: Any,
    teacher_tokenizer: Any = None,
    store: ValueStore | None = None,
) -> bool:
    """Raise `ConfigError` naming what to change when training cannot use the teacher's signals.

    Returns whether teacher and student tokenizers are identical (False without a teacher).
    Cheap: tokenizers and the store's manifest only, so it runs before any weights are loaded.
    """
    for name, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        conv = needs_chat_template(tok, pairs) if tok is not None else None
        if conv is not None:
            raise ConfigError(
                name,
                f"the dataset is conversational (row {conv.row} holds messages) but the {name} "
                "tokenizer has no chat template: use a model folder whose tokenizer has one, or "
                "text-form data (prompt/chosen/rejected strings)",
            )
    if teacher_tokenizer is None:
        return False
    same = tokenizer_fingerprint(student_tokenizer) == tokenizer_fingerprint(teacher_tokenizer)
    if method.shaping in ACTION_SHAPINGS and not same:
        raise ConfigError(
            "shaping",
            f"shaping={method.shaping!r} is action-dependent: it needs the teacher's score of each "
            "student token, which only exists when teacher and student share a tokenizer, and "
            "theirs differ. Use shaping='value' (potential-based; mapped across tokenizers) or a "
            "student with the teacher's tokenizer",
        )
    if store is None:
        return same
    fields = store.fields
    for name in ("q_source", "value_beta"):
        if fields.get(name) != getattr(method, name):
            raise ConfigError(
                name,
                f"the value store {store.path} was computed with {name}={fields.get(name)!r}, the "
                f"method asks for {getattr(method, name)!r}: precompute again with the method's "
                "setting (the pipeline does), or use the store's",
            )
    if method.shaping in ACTION_SHAPINGS and not fields.get("token_stats"):
        raise ConfigError(
            "shaping",
            f"shaping={method.shaping!r} needs the teacher's per-token log-probs/logits and the value "
            f"store {store.path} has none: precompute with token_stats=True",
        )
    fingerprint = dataset_fingerprint(pairs)
    if store.num_pairs != len(pairs) or fields.get("dataset_fingerprint") != fingerprint:
        raise ConfigError(
            "store",
            f"the value store {store.path} was built for other pairs ({store.num_pairs} pairs, "
            f"dataset {str(fields.get('dataset_fingerprint'))[:12]}) than these ({len(pairs)} pairs, "
            f"dataset {fingerprint[:12]}): pass the pairs it was computed for, in the same order, "
            "or precompute for these",
        )
    if fields.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint(teacher_tokenizer)):
        raise ConfigError(
            "teacher",
            f"the value store {store.path} was computed with another tokenizer than this teacher's",
        )
    return same


# --------------------------------------------------------------------------------------------
# Examples and batches


@dataclass
class Example:
    """One kept pair, ready to batch: student token ids and the teacher's signals on them."""

    index: int  # position in `pairs` (and in the value store)
    row: int  # source row, for messages to the user
    prompt_ids: np.ndarray  # int64 [P]
    chosen_ids: np.ndarray  # int64 [Tc], EOS/end-of-turn included
    rejected_ids: np.ndarray
    chosen_values: np.ndarray  # float32 [Tc+1]: V(s_1 .. s_{Tc+1}) at the student's boundaries
    rejected_values: np.ndarray
    # tvkd_loss keyword → float32 [T]: the teacher's log-prob/logit of each token (shared tokenizer
    # and a store with token stats only); the 'logprob'/'logit' modes and the samples use them.
    teacher: dict[str, np.ndarray] = field(default_factory=dict)
    ref_chosen: np.ndarray | None = None  # float32 [Tc]: log π_ref, filled by the reference pass
    ref_rejected: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def build_examples(
    pairs: Sequence[PreferencePair],
    indices: Sequence[int],
    *,
    tokenizer: Any,
    max_length: int,
    store: ValueStore | None = None,
    teacher_tokenizer: Any = None,
    same_tokenizer: bool = True,
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Examples of `pairs[i]` for i in `indices` (sorted), and the pairs dropped with the reason.

    Without a store the values are zeros (ψ ≡ 0). With one, a shared tokenizer uses the stored
    values as they are; another tokenizer maps them onto the student's boundaries (MATH.md,
    "different tokenizers"), which needs the teacher's tokenization of the pair again.
    """
    examples: list[Example] = []
    dropped: list[dict[str, Any]] = []
    teacher_max = int(store.fields["max_length"]) if store is not None else 0
    for i in sorted(set(indices)):
        pair = pairs[i]
        try:
            tp = tokenize_pair(tokenizer, pair, max_length=max_length, index=i)
        except RowError as exc:
            dropped.append({"index": i, "row": pair.row, "code": exc.issue.code, "message": str(exc.issue)})
            continue
        sides = {"chosen": tp.chosen_ids, "rejected": tp.rejected_ids}
        teacher: dict[str, np.ndarray] = {}
        if store is None:
            values = {s: np.zeros(len(ids) + 1, np.float32) for s, ids in sides.items()}
        elif i not in store:
            dropped.append(
                {
                    "index": i,
                    "row": pair.row,
                    "code": "teacher_missing",
                    "message": f"row {pair.row}: not in the value store (the teacher could not take it)",
                }
            )
            continue
        elif same_tokenizer:
            pv = store.pair(i)
            values = {s: np.asarray(getattr(pv, f"{s}_values"), np.float32) for s in sides}
            for s, ids in sides.items():
                if len(values[s]) != len(ids) + 1:
                    raise ValueError(
                        f"pair {i} (row {pair.row}): the value store {store.path} has {len(values[s])} "
                        f"{s} values but the student has {len(ids)} {s} tokens (+1 expected) with the "
                        "same tokenizer: the store was computed from another tokenization of these "
                        "pairs; precompute again"
                    )
                for stat in ("logps", "logits"):
                    arr = getattr(pv, f"{s}_token_{stat}")
                    if arr is not None:
                        teacher[f"{s}_teacher_{stat}"] = np.asarray(arr, np.float32)
        else:
            pv = store.pair(i)
            try:
                tt = tokenize_pair(teacher_tokenizer, pair, max_length=teacher_max, index=i)
            except RowError as exc:  # the store holds it, so this is a different teacher tokenizer
                raise ValueError(f"pair {i}: the teacher tokenizer rejects a stored pair: {exc}") from exc
            values = {
                s: map_boundary_values(  # a copy: store rows are read-only memory-mapped views
                    np.array(getattr(pv, f"{s}_values")), getattr(tt, f"{s}_ends"), getattr(tp, f"{s}_ends")
                ).numpy()
                for s in sides
            }
        examples.append(
            Example(
                index=i,
                row=pair.row,
                prompt_ids=np.asarray(tp.prompt_ids, np.int64),
                chosen_ids=np.asarray(tp.chosen_ids, np.int64),
                rejected_ids=np.asarray(tp.rejected_ids, np.int64),
                chosen_values=values["chosen"],
                rejected_values=values["rejected"],
                teacher=teacher,
            )
        )
    return examples, dropped


def _pad(rows: Sequence[np.ndarray], width: int, dtype: Any = np.float32) -> Tensor:
    out = np.zeros((len(rows), width), dtype=dtype)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return torch.from_numpy(out)


@dataclass
class Batch:
    """B pairs as one [2B, ·] batch: chosen rows 0..B−1, then rejected rows B..2B−1, right-padded."""

    examples: list[Example]
    input_ids: Tensor  # [2B, L] prompt ⊕ response ⊕ padding
    attention_mask: Tensor  # [2B, L]
    prompt_lengths: Tensor  # [2B]
    response_lengths: Tensor  # [2B]
    labels: Tensor  # [N] every row's response tokens back to back, N = Σ response lengths
    response_mask: Tensor  # [2B, T] bool, True on the row's response tokens
    values: Tensor  # [2B, T+1] teacher potentials V(s_1 .. s_{T_b+1}), zero-padded
    ref_logps: Tensor  # [2B, T] log π_ref, zero-padded
    teacher: dict[str, Tensor]  # tvkd_loss keyword → [B, T] (token stats, when present)
    tokens: int  # real (unpadded) tokens in the batch

    @property
    def size(self) -> int:
        return len(self.examples)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[2B, ...] → ([B, ...] chosen, [B, ...] rejected)."""
        return x[: self.size], x[self.size :]


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    rows = [np.concatenate([e.prompt_ids, e.chosen_ids]) for e in examples]
    rows += [np.concatenate([e.prompt_ids, e.rejected_ids]) for e in examples]
    responses = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    width = max(len(r) for r in responses)
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.from_numpy(row)
        attention_mask[r, : len(row)] = 1
    response_lengths = torch.tensor([len(r) for r in responses])
    ref = [e.ref_chosen for e in examples] + [e.ref_rejected for e in examples]
    # "chosen_teacher_logps" etc.: one side each, [B, T] like the log-probs of that side.
    teacher = {key: _pad([e.teacher[key] for e in examples], width).to(device) for key in examples[0].teacher}
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_lengths": torch.tensor([len(e.prompt_ids) for e in examples] * 2),
        "response_lengths": response_lengths,
        "labels": torch.from_numpy(np.concatenate(responses)),
        "response_mask": torch.arange(width)[None, :] < response_lengths[:, None],
        "values": _pad(
            [e.chosen_values for e in examples] + [e.rejected_values for e in examples], width + 1
        ),
        "ref_logps": _pad([np.zeros(0) if r is None else r for r in ref], width),
    }
    return Batch(
        examples=list(examples),
        teacher=teacher,
        tokens=sum(e.tokens for e in examples),
        **{k: v.to(device) for k, v in tensors.items()},
    )


# --------------------------------------------------------------------------------------------
# The forward


def _core(model: Any) -> Any:
    """The Hugging Face model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_logps(model: Any, batch: Batch) -> tuple[Tensor, Tensor]:
    """log π(y_t | s_t) of every response token: ([B, T] chosen, [B, T] rejected), float32, 0 off mask.

    Only the decoder runs over the [2B, L] batch; the LM head and log-softmax run on the N
    response-predicting positions alone, a chunk at a time (`linear_logps`), so [2B, L, vocab]
    logits never exist. hidden[positions] and `labels` are both row-major, so they line up.
    """
    core = _core(model)
    out = core.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    positions = response_positions(batch.attention_mask, batch.prompt_lengths, batch.response_lengths)
    head = core.get_output_embeddings()
    flat = linear_logps(out.last_hidden_state[positions], head.weight, batch.labels, head.bias)
    logps = flat.new_zeros(batch.response_mask.shape).masked_scatter(batch.response_mask, flat)
    return batch.split(logps)


def loss_options(method: MethodConfig, *, shaping: str | None = None) -> dict[str, Any]:
    """The keyword options of `tvkd_loss` for a method (`shaping` overrides the method's)."""
    return {
        "alpha": method.alpha,
        "beta": method.beta,
        "gamma": method.gamma,
        "terminal": method.terminal,
        "shaping": shaping or method.shaping,
        "value_beta": method.value_beta,
        "length_normalize": method.length_normalize,
    }


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR factor of step s: linear warm-up to 1, then cosine down to `min_lr_ratio`."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first step already learns (HF's s/warmup wastes it)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------------------------
# RNG and checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
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
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def _disable_dropout(model: torch.nn.Module) -> None:
    # As TRL does for DPO: π_θ − π_ref must compare the same function; dropout noise in one of
    # them biases the log-ratio. (LoRA dropout, added later, stays as configured.)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _activation_checkpointing(model: Any, enable: bool) -> None:
    core = _core(model)
    if not hasattr(core, "activation_checkpointing_enable"):  # transformers before the rename
        if enable:
            core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            core.gradient_checkpointing_disable()
    elif enable:
        # Non-reentrant: gradients reach LoRA adapters without forcing grads on the inputs.
        core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        core.activation_checkpointing_disable()


def _check_head(model: Any, name: str) -> None:
    cfg = model.config
    for attr in _UNSUPPORTED_HEAD_ATTRS:
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(name, f"{attr}={value!r}: the output head is not a plain linear layer")
    if not isinstance(_core(model).get_output_embeddings(), torch.nn.Linear):
        raise ConfigError(
            "lora_target_modules" if hasattr(model, "get_base_model") else name,
            "the output head must be a plain nn.Linear (do not put LoRA on lm_head)",
        )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped"
    steps: int
    total_steps: int
    metrics: dict[str, float]  # the last reported training metrics
    eval_metrics: dict[str, float]
    history: list[dict[str, Any]]  # every report of this run: {"step", "split", **metrics}
    output_dir: str
    model_dir: str | None
    adapter_dir: str | None
    checkpoint: str | None
    reference_path: str | None
    samples_path: str | None
    train_pairs: int
    eval_pairs: int
    dropped: list[dict[str, Any]]
    same_tokenizer: bool | None
    resumed_from: int | None
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Trains `student` on `pairs[train_idx]` with TVKD; evaluates on `pairs[eval_idx]`.

    `pairs` is the full list the value store is indexed by. `store` is None when the method does
    not use the teacher (alpha == 0 or shaping == "none"); `teacher` (the folder) is then unused.
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
        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        # Metrics of the steps since the last report. A checkpoint carries them, so that a resumed
        # run reports exactly what the uninterrupted one would have (log_every > 1).
        self.window: list[dict[str, float]] = []
        self.tokens_seen = 0
        self._order: tuple[int, list[int]] | None = None

    # ---------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, cb, method = self.config, self.cb, self.config.method
        if method.uses_teacher and self.store is None:
            raise ConfigError(
                "alpha",
                f"the method uses the teacher (alpha={method.alpha}, shaping={method.shaping!r}) but "
                "no value store was given: precompute first, or train plain DPO (alpha=0)",
            )
        if self.store is not None and self.teacher is None:
            raise ConfigError("teacher", "a value store was given without the teacher it came from")
        if not self.train_idx:
            raise ValueError("no training pairs")
        cb.on_stage(
            "setup",
            {"student": self.student, "train_pairs": len(self.train_idx), "eval_pairs": len(self.eval_idx)},
        )
        seed_everything(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_tokenizer(self.student)
        teacher_tok = load_tokenizer(self.teacher) if self.store is not None else None
        same = check_alignment(
            method,
            self.pairs,
            student_tokenizer=self.tokenizer,
            teacher_tokenizer=teacher_tok,
            store=self.store,
        )
        self.same_tokenizer = same if teacher_tok is not None else None
        # Without a store ψ ≡ 0: 'none' keeps tvkd_loss from asking for teacher token stats.
        self.loss_options = loss_options(method, shaping=None if self.store is not None else "none")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        kw = {
            "tokenizer": self.tokenizer,
            "max_length": cfg.max_length,
            "store": self.store,
            "teacher_tokenizer": teacher_tok,
            "same_tokenizer": bool(self.same_tokenizer),
        }
        self.train_examples, dropped = build_examples(self.pairs, self.train_idx, **kw)
        self.eval_examples, dropped_eval = build_examples(self.pairs, self.eval_idx, **kw)
        self.dropped = dropped + dropped_eval
        if self.dropped:
            rows = ", ".join(str(d["row"]) for d in self.dropped[:20])
            more = f" and {len(self.dropped) - 20} more" if len(self.dropped) > 20 else ""
            cb.on_event(
                "warning", f"dropped {len(self.dropped)} pairs (rows {rows}{more})", {"dropped": self.dropped}
            )
        if not self.train_examples:
            raise ValueError(f"no training pair is usable ({len(self.dropped)} dropped; see the events)")

        self.model = load_causal_lm(self.student, dtype=torch.float32, device=self.device)
        _disable_dropout(self.model)
        _check_head(self.model, "student")
        if not self.resume and (self.output_dir / CHECKPOINTS).exists():
            cb.on_event("info", f"fresh start: removing old checkpoints in {self.output_dir / CHECKPOINTS}")
            shutil.rmtree(self.output_dir / CHECKPOINTS)
        self.reference_path = self._reference()  # before LoRA: π_ref is the initial student
        if cfg.lora:
            self.model = self._wrap_lora(self.model)
            _check_head(self.model, "student")
        if cfg.gradient_checkpointing:
            _activation_checkpointing(self.model, True)
        self.model.train()

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [  # no weight decay on norms and biases (nanoGPT's rule: matrices only)
            {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            fused=True if self.device.type == "cuda" else None,  # else torch's default (foreach)
        )
        per_step = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = math.ceil(len(self.train_examples) / per_step)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        )
        if self.resume:
            self._restore_latest()

    def _wrap_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    @torch.no_grad()
    def _reference(self) -> Path | None:
        """log π_ref of every response token of every kept pair, once per job (reused on resume)."""
        path = self.output_dir / REFERENCE_FILE
        examples = sorted(self.train_examples + self.eval_examples, key=lambda e: e.index)
        layout = [[e.index, len(e.chosen_ids), len(e.rejected_ids)] for e in examples]
        meta = {
            "student_fingerprint": model_fingerprint(self.student),
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "pairs": str(len(examples)),
            "layout": _digest(layout),  # which pairs, with how many tokens each
            "bf16": str(self.config.bf16),
        }
        if self.resume and path.is_file():
            ref = RaggedFile(path)
            if all(ref.metadata.get(k) == v for k, v in meta.items()):
                for r, e in enumerate(examples):
                    e.ref_chosen, e.ref_rejected = (
                        np.array(ref.row("chosen", r)),
                        np.array(ref.row("rejected", r)),
                    )
                self.cb.on_event("info", f"reusing reference log-probs {path}")
                return path
            self.cb.on_event("warning", f"{path} was made for another student or pairs: recomputing")
        self.cb.on_stage("reference", {"pairs": len(examples)})
        self.model.eval()
        bs, t0 = self.config.batch_size, time.perf_counter()
        for k in range(0, len(examples), bs):
            if self.cb.should_stop():
                self.stopped = True
                return None
            batch = collate(examples[k : k + bs], self.pad_id, self.device)
            with self._autocast():
                chosen, rejected = policy_logps(self.model, batch)
            chosen, rejected = chosen.float().cpu().numpy(), rejected.float().cpu().numpy()
            for j, e in enumerate(batch.examples):
                e.ref_chosen = chosen[j, : len(e.chosen_ids)].copy()
                e.ref_rejected = rejected[j, : len(e.rejected_ids)].copy()
            done = min(k + bs, len(examples))
            eta = (time.perf_counter() - t0) / done * (len(examples) - done)
            self.cb.on_progress("reference", done, len(examples), eta)
        write_ragged(
            path,
            {"chosen": [e.ref_chosen for e in examples], "rejected": [e.ref_rejected for e in examples]},
            metadata={**meta, "indices": json.dumps([e.index for e in examples])},
        )
        return path

    def _restore_latest(self) -> None:
        ckpt = latest_checkpoint(self.output_dir)
        if ckpt is None:
            self.cb.on_event("info", f"no checkpoint in {self.output_dir}: starting from step 0")
            return
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(ckpt / "model.safetensors", device=str(self.device))
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(tensors) != set(named):
            raise ValueError(
                f"{ckpt} holds other trainable parameters than this run has (lora settings changed?); "
                "resume with the checkpoint's settings or start afresh (--no-resume)"
            )
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(tensors[name])
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt"))
        # Our own file (python/numpy RNG states are not tensors, so not weights-only loadable).
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
        self.step = self.resumed_from = int(state["step"])
        self.window, self.tokens_seen = list(state["window"]), int(state["tokens_seen"])
        self.last_checkpoint = ckpt
        changed = sorted(k for k, v in self.config.to_dict().items() if state["config"].get(k) != v)
        if changed:
            self.cb.on_event(
                "warning",
                f"resuming with changed settings {changed}: the remaining batches "
                "and schedule may differ from the original run",
                {"changed": changed},
            )
        self.cb.on_event("info", f"resumed from {ckpt} at step {self.step}", {"step": self.step})

    # ---------------------------------------------------------------------------- train

    def step_batches(self, step: int) -> list[list[Example]]:
        """The micro-batches of optimizer step `step`, a function of (seed, step) only."""
        cfg = self.config
        per_step = cfg.batch_size * cfg.grad_accum
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_examples), generator=gen).tolist())
        chosen = self._order[1][position * per_step : (position + 1) * per_step]
        return [
            [self.train_examples[i] for i in chosen[k : k + cfg.batch_size]]
            for k in range(0, len(chosen), cfg.batch_size)
        ]

    def train_step(self, micro_batches: list[list[Example]]) -> dict[str, float]:
        """One optimizer step over the micro-batches; returns its metrics (pair-weighted means)."""
        n_pairs = sum(len(mb) for mb in micro_batches)
        metrics: dict[str, float] = {}
        for examples in micro_batches:
            batch = collate(examples, self.pad_id, self.device)
            with self._autocast():
                chosen, rejected = policy_logps(self.model, batch)  # one decoder pass, [2B, L]
            loss, batch_metrics = tvkd_loss(
                chosen,
                rejected,
                *batch.split(batch.ref_logps),
                *batch.split(batch.values),
                *batch.split(batch.response_mask),
                **batch.teacher,
                **self.loss_options,
            )
            # Weighted by pairs: the step's gradient is that of the mean loss over all its pairs,
            # even when the last micro-batch of an epoch is short.
            (loss * (batch.size / n_pairs)).backward()
            for name, value in batch_metrics.items():
                metrics[name] = metrics.get(name, 0.0) + value * batch.size / n_pairs
            self.tokens_seen += batch.tokens
        lr = self.scheduler.get_last_lr()[0]
        # max_grad_norm = 0 turns clipping off; the norm is still reported.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # one bad batch must not turn every weight into NaN
            self.cb.on_event("warning", f"non-finite gradient norm at step {self.step + 1}: step skipped")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "epoch": (self.step + 1) / self.steps_per_epoch}

    def train(self) -> TrainResult:
        cfg, cb = self.config, self.cb
        start_step, t0, tokens0 = self.step, time.perf_counter(), self.tokens_seen
        cb.on_stage(
            "train",
            {
                "steps": self.total_steps,
                "start_step": self.step,
                "train_pairs": len(self.train_examples),
                "eval_pairs": len(self.eval_examples),
            },
        )
        while not self.stopped and self.step < self.total_steps:
            if cb.should_stop():
                self.stopped = True
                break
            self.window.append(self.train_step(self.step_batches(self.step)))
            self.step += 1
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
            return self._result("stopped", seconds, tps, eval_metrics={}, samples=None, model_dir=None)
        eval_metrics = self.evaluate()
        samples = self.write_samples()
        self.save_checkpoint()
        model_dir = self.save_model()
        return self._result("completed", seconds, tps, eval_metrics, samples, model_dir)

    def _report(self) -> None:
        """Mean of the steps since the last report; lr and epoch as of the last step."""
        window, self.window = self.window, []
        metrics = {k: sum(m[k] for m in window) / len(window) for k in window[-1]}
        metrics["lr"], metrics["epoch"] = window[-1]["lr"], window[-1]["epoch"]
        self.last_metrics = metrics
        self.history.append({"step": self.step, "split": "train", **metrics})
        self.cb.on_metrics(self.step, metrics, "train")

    def _result(
        self,
        status: str,
        seconds: float,
        tps: float,
        eval_metrics: dict[str, float],
        samples: Path | None,
        model_dir: Path | None,
    ) -> TrainResult:
        adapter = self.output_dir / "adapter"
        return TrainResult(
            status=status,
            steps=self.step,
            total_steps=self.total_steps,
            metrics=self.last_metrics,
            eval_metrics=eval_metrics,
            history=self.history,
            output_dir=str(self.output_dir),
            model_dir=str(model_dir) if model_dir else None,
            adapter_dir=str(adapter) if model_dir and self.config.lora else None,
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            reference_path=str(self.reference_path) if self.reference_path else None,
            samples_path=str(samples) if samples else None,
            train_pairs=len(self.train_examples),
            eval_pairs=len(self.eval_examples),
            dropped=self.dropped,
            same_tokenizer=self.same_tokenizer,
            resumed_from=self.resumed_from,
            seconds=seconds,
            tokens_per_second=tps,
        )

    # ---------------------------------------------------------------------------- evaluate

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics over every eval pair (reported with split="eval")."""
        from tvkd.evaluate import evaluate  # evaluate.py builds on this module's batches

        if not self.eval_examples:
            return {}
        self.cb.on_stage("evaluate", {"pairs": len(self.eval_examples), "step": self.step})
        bs = self.config.batch_size
        batches = (
            collate(self.eval_examples[k : k + bs], self.pad_id, self.device)
            for k in range(0, len(self.eval_examples), bs)
        )
        metrics = evaluate(self.model, batches, self.loss_options, bf16=self.config.bf16)
        self.history.append({"step": self.step, "split": "eval", **metrics})
        self.cb.on_metrics(self.step, metrics, "eval")
        return metrics

    def write_samples(self) -> Path | None:
        from tvkd.evaluate import write_samples

        examples = self.eval_examples[: self.config.num_samples]
        if not examples:
            return None
        self.cb.on_stage("samples", {"pairs": len(examples)})
        return write_samples(
            self.output_dir / "samples.json",
            model=self.model,
            tokenizer=self.tokenizer,
            examples=examples,
            pairs=self.pairs,
            loss_options=self.loss_options,
            teacher=self.teacher if self.store is not None else None,
            same_tokenizer=bool(self.same_tokenizer),
            teacher_max_length=int(self.store.fields["max_length"]) if self.store is not None else None,
            device=self.device,
            bf16=self.config.bf16,
            step=self.step,
        )

    # ---------------------------------------------------------------------------- save

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN/: trainable weights, optimizer, scheduler, RNG, state.json."""
        root = self.output_dir / CHECKPOINTS
        final = root / f"step-{self.step:06d}"
        if self.last_checkpoint == final and final.is_dir():
            return final  # e.g. save_every landed on the last step
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        epoch, position = divmod(self.step, self.steps_per_epoch)
        state = {
            "step": self.step,
            "epoch": epoch,
            "position": position,
            "total_steps": self.total_steps,
            "config": self.config.to_dict(),
            "metrics": self.last_metrics,
            "tokens_seen": self.tokens_seen,
            "window": self.window,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # last: marks it complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.last_checkpoint = final
        for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.cb.on_checkpoint(self.step, str(final))
        return final

    def save_model(self) -> Path:
        """output_dir/model: a plain HF folder (safetensors + tokenizer); LoRA merged into it."""
        self.cb.on_stage("save", {"lora": self.config.lora})
        out, tmp = self.output_dir / "model", self.output_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model
        if self.config.lora:
            model.save_pretrained(self.output_dir / "adapter")  # the adapter alone, for peft users
            model = self.model = model.merge_and_unload()
        if self.config.gradient_checkpointing:
            _activation_checkpointing(model, False)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    # ---------------------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """Drop the model and optimizer (a worker process runs many jobs one after another)."""
        for name in ("model", "optimizer", "scheduler", "params"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
