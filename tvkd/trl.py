"""TVKD inside TRL: `TVKDTrainer`, a `trl.DPOTrainer` whose loss carries the teacher's shaping.

MATH.md "Loss": h(y) = Σ_t [β·(log π_θ − log π_ref) + α·ψ_t], L = −log σ(h(y_w) − h(y_l)). With
Ψ(y) = Σ_t ψ_t (a constant in θ), h(y) = β·(log π_θ(y) − [log π_ref(y) − (α/β)·Ψ(y)]): TVKD is
DPO against a *shaped reference*. So TVKDTrainer lets TRL do everything it does (tokenizing,
the reference pass `precompute_ref_log_probs`, the fused forward, the sigmoid loss, its
metrics, accelerate/DeepSpeed, callbacks, `report_to`) and only moves each batch's reference
log-probs by −(α/β)·Ψ before TRL's loss sees them. `length_normalize=True` is TRL's
`sigmoid_norm` loss, which divides the shaped log-ratio by the response length exactly as
MATH.md does.

The teacher's values come from tvkd's value store (`tvkd.precompute.precompute_values`: read when
a store with the same content key exists under `value_store_root`, computed on first use
otherwise). The store is in the teacher's tokens, so the teacher must share the student's
tokenizer, and each row's tokens as tvkd tokenizes it must be the ones TRL trains on (checked
row by row; a mismatch raises naming the row). Use `tvkd train` for a teacher with another
tokenizer or for the 'logprob'/'logit' ablation modes.

Metrics: TRL's own (`rewards/*` are of the shaped margin h here: rewards/chosen = β·log-ratio +
α·Ψ), plus `tvkd/shaping_chosen`, `tvkd/shaping_rejected` (α·Ψ, means) and
`tvkd/shaping_accuracy` (Ψ_w > Ψ_l) as in MATH.md "Metrics".

Tested against TRL 1.16.0 (the `trl` extra pins it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from tvkd.config import ConfigError, MethodConfig, PrecomputeConfig, QSource, Terminal
from tvkd.losses import shaping_terms

INDEX = "tvkd_index"  # the row's position in the dataset given to the trainer (survives TRL's filter)
VALUE_COLUMNS = ("chosen_values", "rejected_values")
SUPPORTED_TRL = "1.16.0"


@dataclass
class TVKDConfig(DPOConfig):
    """`trl.DPOConfig` plus the TVKD fields of MATH.md (`tvkd.config.MethodConfig`; β is DPO's
    `beta`) and where the teacher's values come from. Invalid values raise `ConfigError` naming
    the field."""

    alpha: float = field(default=0.7, metadata={"help": "Weight α of the teacher shaping ψ. 0 = DPO."})
    value_beta: float = field(default=1.0, metadata={"help": "Temperature β_v of V = β_v·logsumexp(Q/β_v)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount γ in ψ_t = γ·V(s_{t+1}) − V(s_t)."})
    terminal: Terminal = field(
        default="model", metadata={"help": "'model', 'zero' or 'pre_eos' (V(s_T)): V(s_{T+1})."}
    )
    q_source: QSource = field(
        default="logits",
        metadata={
            "help": "Q = teacher 'logits' or 'logprobs'; 'implicit': its DPO reward (teacher reference)."
        },
    )
    shaping: str = field(default="value", metadata={"help": "'value' (potential-based) or 'none' (DPO)."})
    length_normalize: bool = field(
        default=False, metadata={"help": "Divide log-ratio and shaping by the response length."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's folder (needed when alpha > 0)."}
    )
    teacher_reference_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model the teacher was DPO-trained from (needed by q_source='implicit')."},
    )
    value_store_root: str | None = field(
        default=None,
        metadata={"help": "Value store root (default: $TVKD_ARTIFACT_ROOT/values, else ./.tvkd/values)."},
    )
    teacher_bf16: bool = field(default=False, metadata={"help": "Teacher pass under bf16 autocast."})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        want = ["sigmoid_norm"] if self.length_normalize else ["sigmoid"]
        if list(self.loss_type) not in (["sigmoid"], want):
            raise ConfigError("loss_type", f"TVKD is the sigmoid (DPO) loss; got {self.loss_type}")
        self.loss_type = want
        if self.shaping not in ("value", "none"):
            raise ConfigError(
                "shaping", f"TVKDTrainer supports 'value' and 'none'; got {self.shaping!r} (use tvkd train)"
            )
        for name, ok in (
            ("ld_alpha", self.ld_alpha is None),
            ("f_divergence_type", self.f_divergence_type == "reverse_kl"),
            ("use_weighting", not self.use_weighting),
            ("sync_ref_model", not self.sync_ref_model),
        ):
            if not ok:
                raise ConfigError(name, "not part of the TVKD loss; leave it at TRL's default")
        self.precompute_ref_log_probs = True  # π_ref is the initial student, computed once (as tvkd does)
        _ = self.method  # checks the MATH.md fields, naming the first bad one
        super().__post_init__()

    @property
    def method(self) -> MethodConfig:
        """The MATH.md options as tvkd's `MethodConfig` (validated on construction)."""
        return MethodConfig(
            alpha=self.alpha,
            beta=self.beta,
            value_beta=self.value_beta,
            gamma=self.gamma,
            terminal=self.terminal,
            q_source=self.q_source,
            shaping=self.shaping,  # type: ignore[arg-type]
            length_normalize=self.length_normalize,
        )


@dataclass
class TVKDCollator(DataCollatorForPreference):
    """TRL's preference collator, plus each row's teacher values (right-padded [B, T+1] float32,
    chosen and rejected) and its dataset index, when the examples carry them."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        if INDEX in examples[0]:
            out[INDEX] = torch.tensor([int(e[INDEX]) for e in examples])
        for name in VALUE_COLUMNS:
            if name in examples[0]:
                rows = [torch.tensor(e[name], dtype=torch.float32) for e in examples]
                out[name] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return out


class TVKDTrainer(DPOTrainer):
    """`trl.DPOTrainer` with the TVKD loss (see the module docstring). Same arguments as
    DPOTrainer; `args` must be a `TVKDConfig`. Datasets must be map-style `datasets.Dataset`s in
    one of TRL's preference forms (prompt/chosen/rejected, text or conversational).

    Raises `ConfigError` (a setting, named) for a missing teacher or a non-TVKD loss option,
    `ValueError` naming the row when tvkd's tokenization of a row differs from TRL's.
    """

    def __init__(
        self, model: Any = None, ref_model: Any = None, args: TVKDConfig | None = None, **kwargs: Any
    ):
        if not isinstance(args, TVKDConfig):
            raise ConfigError("args", f"TVKDTrainer needs a TVKDConfig; got {type(args).__name__}")
        self.method = args.method
        if self.method.uses_teacher and not args.teacher_model_name_or_path:
            raise ConfigError("teacher_model_name_or_path", "alpha > 0 needs the teacher's folder")
        originals = {}
        for name in ("train_dataset", "eval_dataset"):
            data = kwargs.get(name)
            if data is None:
                continue
            if not hasattr(data, "add_column"):
                raise ValueError(f"{name}: TVKDTrainer needs a map-style datasets.Dataset (or None)")
            originals[name] = data
            kwargs[name] = data.add_column(INDEX, list(range(len(data))))
        processing_class = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and processing_class is not None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            kwargs["data_collator"] = TVKDCollator(pad_token_id=pad, max_length=args.max_length)
        super().__init__(model=model, ref_model=ref_model, args=args, **kwargs)
        self.value_stores: dict[str, Any] = {}  # "train"/"eval" → the tvkd ValueStore read
        self.values_cached: dict[str, bool] = {}  # … and whether it was already there
        if self.method.uses_teacher:
            self.train_dataset = self._add_values(self.train_dataset, originals.get("train_dataset"), "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._add_values(self.eval_dataset, originals.get("eval_dataset"), "eval")

    # ---------------------------------------------------------------------------- values

    def _add_values(self, dataset: Any, original: Any, name: str) -> Any:
        from tvkd.precompute import precompute_values

        if original is None:
            return dataset
        pairs = _pairs(original, name)
        args: TVKDConfig = self.args  # type: ignore[assignment]
        config = PrecomputeConfig(
            q_source=self.method.q_source,
            value_beta=self.method.value_beta,
            max_length=args.max_length or 1024,
            bf16=args.teacher_bf16,
        )
        result = precompute_values(
            args.teacher_model_name_or_path,  # type: ignore[arg-type]
            pairs,
            config,
            store_root=args.value_store_root or _default_store_root(),
            device=self.accelerator.device,
            on_error="drop",
            teacher_reference=args.teacher_reference_model_name_or_path,
        )
        store = result.store
        self.value_stores[name], self.values_cached[name] = store, result.cached
        teacher_tokenizer = _teacher_tokenizer(args.teacher_model_name_or_path)

        def add(example: dict[str, Any]) -> dict[str, Any]:
            i = int(example[INDEX])
            _check_tokens(teacher_tokenizer, pairs[i], example, config.max_length, name, i)
            if i not in store:
                raise ValueError(f"{name} row {i}: the teacher could not take it (longer than max_length?)")
            pv = store.pair(i)
            return {"chosen_values": list(pv.chosen_values), "rejected_values": list(pv.rejected_values)}

        return dataset.map(add, desc=f"Teacher values for the {name} dataset")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and INDEX not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, INDEX, *VALUE_COLUMNS]

    # ---------------------------------------------------------------------------- loss

    def compute_ref_log_probs(self, model, inputs):  # type: ignore[override]
        """TRL's reference pass, without the batch's tvkd columns (they are no model inputs)."""
        return super().compute_ref_log_probs(model, _model_inputs(inputs))

    def shaping_sums(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ψ(y_w), Ψ(y_l) of each pair of a collated batch ([B] each, float32): Σ_t ψ_t over the
        response tokens TRL keeps (after its truncation); zeros without a teacher."""
        completion = inputs["completion_mask"]
        lengths = completion.sum(-1)
        chosen_len, rejected_len = lengths.chunk(2, dim=0)
        if not self.method.uses_teacher or "chosen_values" not in inputs:
            zeros = torch.zeros(chosen_len.shape, dtype=torch.float32, device=completion.device)
            return zeros, zeros.clone()
        sums = []
        for values, n in ((inputs["chosen_values"], chosen_len), (inputs["rejected_values"], rejected_len)):
            values = values.to(torch.float32)
            t = values.shape[1] - 1
            mask = torch.arange(t, device=values.device)[None, :] < n[:, None]
            psi = shaping_terms(
                "value",
                values,
                mask,
                gamma=self.method.gamma,
                terminal=self.method.terminal,
                teacher_logps=None,
                teacher_logits=None,
                value_beta=self.method.value_beta,
            )
            sums.append(torch.where(mask, psi, torch.zeros_like(psi)).sum(-1))
        return sums[0], sums[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        """TRL's loss with each reference log-prob moved by −(α/β)·Ψ (the shaping in the margin)."""
        psi_c, psi_r = self.shaping_sums(inputs)
        inputs = _model_inputs(inputs)
        alpha, beta = self.method.alpha, self.method.beta
        if self.method.uses_teacher:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            inputs["ref_chosen_logps"] = ref_c - (alpha / beta) * psi_c.to(ref_c.dtype)
            inputs["ref_rejected_logps"] = ref_r - (alpha / beta) * psi_r.to(ref_r.dtype)
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._log_shaping(inputs, psi_c, psi_r)
        return out

    def _log_shaping(self, inputs: dict[str, Any], psi_c: torch.Tensor, psi_r: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        alpha = self.method.alpha
        if self.method.length_normalize:
            chosen_len, rejected_len = inputs["completion_mask"].sum(-1).chunk(2, dim=0)
            psi_c, psi_r = psi_c / chosen_len.clamp(min=1), psi_r / rejected_len.clamp(min=1)
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["tvkd/shaping_chosen"].append(gather(alpha * psi_c.detach()).mean().item())
        metrics["tvkd/shaping_rejected"].append(gather(alpha * psi_r.detach()).mean().item())
        metrics["tvkd/shaping_accuracy"].append(gather((psi_c > psi_r).float()).mean().item())


def _model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in (INDEX, *VALUE_COLUMNS)}


def _default_store_root() -> str:
    import os

    root = os.environ.get("TVKD_ARTIFACT_ROOT")
    return os.path.join(root, "values") if root else os.path.join(".tvkd", "values")


def _teacher_tokenizer(path: str | None) -> Any:
    from tvkd.models import load_tokenizer

    return load_tokenizer(str(path))


def _pairs(dataset: Any, name: str) -> list[Any]:
    """tvkd's PreferencePairs of a TRL preference dataset (row i → pair i)."""
    from tvkd.rows import parse_record

    out = []
    for i, record in enumerate(dataset):
        conversational = isinstance(record.get("chosen"), list)
        layout = "conversational" if conversational else "text"
        pair, issues = parse_record(
            layout, i, {k: record[k] for k in ("prompt", "chosen", "rejected", "tools") if k in record}
        )
        if pair is None:
            raise ValueError(f"{name} row {i}: {'; '.join(str(x) for x in issues)}")
        out.append(pair)
    return out


def _check_tokens(
    tokenizer: Any, pair: Any, example: dict[str, Any], max_length: int, name: str, i: int
) -> None:
    """tvkd's tokens of the pair (those the store's values belong to) must be TRL's."""
    from tvkd.tokenize import tokenize_pair

    tp = tokenize_pair(tokenizer, pair, max_length=max_length, index=i)
    for side in ("chosen", "rejected"):
        ours = [int(t) for t in tp.prompt_ids] + [int(t) for t in getattr(tp, f"{side}_ids")]
        theirs = list(example["prompt_ids"]) + list(example[f"{side}_ids"])
        if ours != theirs:
            raise ValueError(
                f"{name} row {i}: the teacher's tokens of the {side} sequence differ from TRL's "
                f"(tvkd {len(ours)} tokens, TRL {len(theirs)}): the teacher must share the student's "
                "tokenizer and chat template (use `tvkd train` otherwise)"
            )


__all__ = ["SUPPORTED_TRL", "TVKDCollator", "TVKDConfig", "TVKDTrainer"]
