"""The job spec: the training settings of each job kind and the `JobSpec` that carries them whole.

`MethodConfig` is the TVKD objective of MATH.md; `TrainConfig` one TVKD (or DPO) training job (it
embeds a `MethodConfig`); `SFTConfig` one supervised fine-tuning job. `split_settings` is the one
flat → nested merge of a request's (or the CLI's) settings, `flat_settings` its reverse. A service
job stores `JobSpec.settings()` at submit; every stage rebuilds the spec from it (`from_dict`).
These are kept in one module so that a setting such as `alpha` is followed through one file from
its declaration to the spec (README, "Architecture"); how a field is declared and checked is
tvkd/config/fields.py, the job options tvkd/config/options.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tvkd.config.choices import JOB_KINDS, JobKind, ParallelMode, QSource, Shaping, Terminal, Truncation
from tvkd.config.fields import ConfigError, _build, _check_choice, _help, _like, _refuse_unknown, check_fields
from tvkd.config.options import JobOptions


@dataclass
class MethodConfig:
    """The TVKD objective of MATH.md (loss and shaping options)."""

    # The upper and lower bounds keep the float32 arithmetic finite (MATH.md "Loss"): α·ψ, β·log-ratio
    # and Q/β_v stay far from overflow, and β_v is no denormal (1e-40 is 0 in float32).
    alpha: float = _help(
        "Weight α of the teacher shaping term ψ in the DPO margin. 0 = DPO.", default=0.7, ge=0.0, le=1e3
    )
    beta: float = _help("DPO temperature β on the student/reference log-ratio.", default=0.1, gt=0.0, le=1e3)
    value_beta: float = _help(
        "Temperature β_v of the teacher soft value V = β_v·logsumexp(Q/β_v).",
        default=1.0,
        ge=1e-3,
        le=1e3,
    )
    gamma: float = _help("Discount γ in ψ_t = γ·V(s_{t+1}) − V(s_t).", default=1.0, ge=0.0, le=1.0)
    terminal: Terminal = _help(
        "'model': V(s_{T+1}) is the teacher's value after the last token; 'zero': V(s_{T+1}) := 0; "
        "'pre_eos': V(s_{T+1}) := V(s_T), the state where the teacher chose to end (MATH.md).",
        default="model",
    )
    q_source: QSource = _help(
        "'logits': Q = teacher logits; 'logprobs': Q = teacher log-probabilities (V≡0 at β_v=1); "
        "'implicit': V = β_v·Σ log π_φ/π_φref, the teacher's DPO reward (needs teacher_reference; "
        "set value_beta to the teacher's DPO β).",
        default="logits",
    )
    shaping: Shaping = _help(
        "'value' (potential-based, default), 'logprob' or 'logit' (action-dependent ablations), "
        "'none' (plain DPO).",
        default="value",
    )
    length_normalize: bool = _help(
        "Divide each response's summed log-ratio and shaping by its token count.", default=False
    )
    sft_weight: float = _help(
        "Weight λ of the NLL of the chosen response (mean over its tokens) added to each pair's "
        "loss (RPO; TRL's 'sft' term). 0 = off.",
        default=0.0,
        ge=0.0,
        le=1e4,
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def warnings(self) -> list[str]:
        """Settings that are legal but almost certainly not what the user meant."""
        out = []
        if self.shaping == "value" and self.alpha > 0 and self.gamma == 1.0 and self.terminal == "zero":
            out.append(
                "gamma=1 with terminal='zero' makes the shaping cancel between chosen and "
                "rejected: the loss equals plain DPO (MATH.md property 3)."
            )
        if (
            self.shaping == "value"
            and self.alpha > 0
            and self.q_source == "logprobs"
            and self.value_beta == 1.0
        ):
            out.append("q_source='logprobs' with value_beta=1 gives V≡0: the shaping term is zero.")
        return out

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0 and self.shaping != "none"


@dataclass
class TrainConfig:
    """One TVKD training job of a student on preference pairs with precomputed teacher values."""

    method: MethodConfig = _help("The TVKD objective.", default_factory=MethodConfig)
    epochs: float = _help("Passes over the training pairs (fractions allowed).", default=1.0, gt=0.0)
    max_steps: int = _help("Stop after this many optimizer steps (0 = from epochs).", default=0, ge=0)
    batch_size: int = _help("Pairs per micro-batch.", default=8, ge=1)
    grad_accum: int = _help("Micro-batches per optimizer step.", default=1, ge=1)
    learning_rate: float = _help("Peak AdamW learning rate.", default=5e-6, gt=0.0, le=1.0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0, ge=0.0)
    adam_beta1: float = _help("AdamW β1.", default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = _help("AdamW β2.", default=0.999, ge=0.0, lt=1.0)
    warmup_ratio: float = _help(
        "Fraction of steps of linear warm-up before the cosine decay.", default=0.1, ge=0.0, le=1.0
    )
    min_lr_ratio: float = _help(
        "Cosine floor as a fraction of the peak learning rate.", default=0.0, ge=0.0, le=1.0
    )
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", default=1.0, ge=0.0)
    max_skipped_steps: int = _help(
        "A step whose gradient norm is not finite is skipped; the run fails (code "
        "nonfinite_gradients) when this many steps in a row are skipped.",
        default=3,
        ge=1,
    )
    max_skipped_fraction: float = _help(
        "The run also fails when more than this fraction of its steps are skipped (one skipped "
        "step is always tolerated).",
        default=0.1,
        ge=0.0,
        le=1.0,
    )
    max_length: int = _help(
        "Longest prompt+response in tokens. The job uses the smaller of this and the student's and "
        "teacher's context windows (max_position_embeddings, n_positions, ...).",
        default=1024,
        ge=2,
    )
    truncation_mode: Truncation = _help(
        "Rows longer than the effective max_length: 'none' makes them bad rows (too_long); TRL's "
        "'keep_start' keeps the prompt and cuts the end of the responses; 'keep_end' keeps the "
        "responses whole and cuts the start of the prompt.",
        default="none",
    )
    bf16: bool = _help(
        "bf16 autocast for the student forward/backward (log-probs stay float32).", default=False
    )
    seed: int = _help("Seed of weights' dropout, data order and everything random.", default=0, ge=0)
    save_every: int = _help("Checkpoint every N optimizer steps (0 = only at the end).", default=0, ge=0)
    keep_checkpoints: int = _help("Checkpoints kept on disk (the newest ones).", default=2, ge=1)
    eval_every: int = _help(
        "Evaluate on the held-out pairs every N steps (0 = only at the end).", default=0, ge=0
    )
    eval_fraction: float = _help(
        "Held-out fraction of the pairs when no eval dataset is given.", default=0.05, ge=0.0, lt=1.0
    )
    num_samples: int = _help("Held-out pairs written as per-token samples for inspection.", default=4, ge=0)
    log_every: int = _help("Report training metrics every N optimizer steps.", default=1, ge=1)
    lora: bool = _help("Train LoRA adapters (peft) instead of all weights.", default=False)
    lora_r: int = _help("LoRA rank.", default=16, ge=1)
    lora_alpha: float = _help("LoRA scaling α.", default=32.0, gt=0.0)
    lora_dropout: float = _help("LoRA dropout.", default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = _help(
        "Module names to adapt (default: all linear projections of attention and MLP).",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=False)
    padding_free: bool = _help(
        "Run each micro-batch's sequences back to back in one row, without padding (same log-probs; "
        "fastest with flash or flex attention, which skip the other sequences' blocks).",
        default=False,
    )
    torch_compile: bool = _help(
        "torch.compile the student's decoder for the training step (same log-probs to float "
        "tolerance; the first steps compile).",
        default=False,
    )
    num_processes: int = _help(
        "Processes (devices) of the train stage, one per device: the service runs it under "
        "torchrun on a worker with at least this many devices (README 'Scaling'); the library "
        "CLI runs under `torchrun --nproc-per-node N` instead.",
        default=1,
        ge=1,
    )
    num_nodes: int = _help(
        "Nodes of the train stage. The service runs 1 only; a multi-node run goes through the "
        "library CLI under a cluster scheduler (README 'Scaling').",
        default=1,
        ge=1,
    )
    parallel: ParallelMode = _help(
        "Under torchrun (world size > 1): 'ddp' replicates the student (DistributedDataParallel), "
        "'fsdp' shards it per decoder layer (FSDP2 fully_shard); 'auto' is ddp. One process "
        "ignores it. Each step's batch is batch_size × grad_accum pairs whatever the world size.",
        default="auto",
    )
    fsdp_cpu_offload: bool = _help(
        "With parallel='fsdp': keep the sharded parameters, gradients and optimizer state in CPU "
        "memory (FSDP2 CPUOffloadPolicy); nothing to do when the device is the CPU.",
        default=False,
    )

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):
            self.method = MethodConfig(**self.method)
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a flat or nested dict (flat method keys win over a nested `method`);
        unknown keys are an error naming the key."""
        data = dict(data)
        method_fields = {f.name for f in dataclasses.fields(MethodConfig)}
        train_fields = {f.name for f in dataclasses.fields(cls)}
        method = dict(data.pop("method", {}) or {})
        for key in list(data):
            if key in method_fields and key not in train_fields:
                method[key] = data.pop(key)
        _refuse_unknown(data, train_fields)
        return cls(method=_build(MethodConfig, method), **data)


# TrainConfig settings an SFT job does not have: the TVKD method, per-token samples of pairs,
# and packing (padding_free packs preference pairs; SFT rows are not packed yet), and
# truncation_mode (preference-pair tokenization; SFT rows follow tvkd.completions' own rules).
SFT_EXCLUDED = ("method", "num_samples", "padding_free", "truncation_mode")


@dataclass
class SFTConfig:
    """One supervised fine-tuning job (`tvkd sft`, job kind "sft"): mean NLL of the response
    tokens of chosen responses or prompt/completion rows. The training settings are those of
    `TrainConfig` (same help, bounds and meaning; only defaults and wording differ), all but
    `SFT_EXCLUDED`: a new TrainConfig setting must be added here or there (a test checks)."""

    epochs: float = _like(TrainConfig, "epochs", help="Passes over the training rows (fractions allowed).")
    max_steps: int = _like(TrainConfig, "max_steps")
    batch_size: int = _like(TrainConfig, "batch_size", help="Rows (prompt + response) per micro-batch.")
    grad_accum: int = _like(TrainConfig, "grad_accum")
    learning_rate: float = _like(TrainConfig, "learning_rate", default=2e-5)
    weight_decay: float = _like(TrainConfig, "weight_decay")
    adam_beta1: float = _like(TrainConfig, "adam_beta1")
    adam_beta2: float = _like(TrainConfig, "adam_beta2")
    warmup_ratio: float = _like(TrainConfig, "warmup_ratio")
    min_lr_ratio: float = _like(TrainConfig, "min_lr_ratio")
    max_grad_norm: float = _like(TrainConfig, "max_grad_norm")
    max_skipped_steps: int = _like(TrainConfig, "max_skipped_steps")
    max_skipped_fraction: float = _like(TrainConfig, "max_skipped_fraction")
    max_length: int = _like(TrainConfig, "max_length")
    bf16: bool = _like(TrainConfig, "bf16")
    seed: int = _like(TrainConfig, "seed")
    save_every: int = _like(TrainConfig, "save_every")
    keep_checkpoints: int = _like(TrainConfig, "keep_checkpoints")
    eval_every: int = _like(TrainConfig, "eval_every")
    eval_fraction: float = _like(
        TrainConfig, "eval_fraction", help="Held-out fraction of the rows when no eval dataset is given."
    )
    log_every: int = _like(TrainConfig, "log_every")
    lora: bool = _like(TrainConfig, "lora")
    lora_r: int = _like(TrainConfig, "lora_r")
    lora_alpha: float = _like(TrainConfig, "lora_alpha")
    lora_dropout: float = _like(TrainConfig, "lora_dropout")
    lora_target_modules: list[str] = _like(TrainConfig, "lora_target_modules")
    gradient_checkpointing: bool = _like(TrainConfig, "gradient_checkpointing")
    torch_compile: bool = _like(TrainConfig, "torch_compile")
    num_processes: int = _like(TrainConfig, "num_processes")
    num_nodes: int = _like(TrainConfig, "num_nodes")
    parallel: ParallelMode = _like(TrainConfig, "parallel")
    fsdp_cpu_offload: bool = _like(TrainConfig, "fsdp_cpu_offload")

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTConfig:
        """Build from a flat dict; unknown keys (a TVKD method setting included) are an error
        naming the key."""
        return _build(cls, data)


def split_settings(flat: Mapping[str, Any]) -> tuple[TrainConfig, JobOptions]:
    """The one flat → nested merge: each key of a flat settings dict (a job request's `alpha`,
    `beta` and `hyperparameters`, or the CLI's flags) goes to the JobOptions, MethodConfig or
    TrainConfig field of its name. Raises ConfigError naming an unknown or invalid setting."""
    names = {f.name for f in dataclasses.fields(JobOptions)}
    options = JobOptions.from_dict({k: v for k, v in flat.items() if k in names})
    train = TrainConfig.from_dict({k: v for k, v in flat.items() if k not in names})
    require_teacher_reference(train.method, options)
    return train, options


def require_teacher_reference(method: MethodConfig, options: JobOptions) -> None:
    """`q_source="implicit"` (when the method uses the teacher) needs `teacher_reference`."""
    if method.uses_teacher and method.q_source == "implicit" and not options.teacher_reference:
        raise ConfigError(
            "teacher_reference",
            "q_source='implicit' needs the model the teacher was DPO-trained from (e.g. its SFT checkpoint)",
        )


def flat_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The reverse of `split_settings`, on a stored spec's {"train": {..., "method": {...}},
    "options": {...}}: every setting at the top level (method, then training, then options).
    An "sft" job's train settings have no method."""
    train = dict(settings["train"])
    return {**train.pop("method", {}), **train, **settings["options"]}


NOT_SFT_OPTIONS = frozenset(
    {"precompute_bf16", "teacher_reference", "gen_prompts", "gen_max_new_tokens", "reward_model"}
)


def split_sft_settings(flat: Mapping[str, Any]) -> tuple[SFTConfig, JobOptions]:
    """`split_settings` for an "sft" job: each key to the SFTConfig or JobOptions field of its
    name (precompute_bf16, teacher_reference and the generation evaluation's options are not SFT
    options). Raises ConfigError naming an unknown or invalid setting (a TVKD method setting such
    as alpha included)."""
    names = {f.name for f in dataclasses.fields(JobOptions)} - NOT_SFT_OPTIONS
    _refuse_unknown(flat, names | {f.name for f in dataclasses.fields(SFTConfig)})
    options = JobOptions.from_dict({k: v for k, v in flat.items() if k in names})
    return SFTConfig.from_dict({k: v for k, v in flat.items() if k not in names}), options


def check_kind(kind: str, train: TrainConfig | SFTConfig) -> None:
    """The settings fit the job's kind (JOB_KINDS): an "sft" job takes an SFTConfig, the others a
    TrainConfig, and a "dpo" job's method uses no teacher. Raises ConfigError naming `kind` or
    `alpha`. Run by `JobSpec` and by the API at submit (service/validation.py)."""
    _check_choice("kind", kind, JOB_KINDS)
    if (kind == "sft") != isinstance(train, SFTConfig):
        want = "SFTConfig" if kind == "sft" else "TrainConfig"
        raise ConfigError("kind", f"a {kind!r} job takes a {want}; got {type(train).__name__}")
    if kind == "dpo" and isinstance(train, TrainConfig) and train.method.uses_teacher:
        raise ConfigError("alpha", f"a 'dpo' job trains plain DPO: alpha must be 0; got {train.method.alpha}")


@dataclass
class JobSpec:
    """Everything one job needs: its kind, the models and data (local paths or hub ids), the
    settings, and where to write. `teacher` may be None when the method does not use it.

    `kind` is one of JOB_KINDS: "tvkd" (the default: `train` a TrainConfig), "dpo" (a
    TrainConfig whose method uses no teacher: alpha 0 or shaping 'none'), "sft" (`train` an
    SFTConfig; no teacher). A service job stores `settings()` at submit; a worker rebuilds the
    spec from it with its own paths (`from_dict`), so the settings are validated once, by the
    dataclasses, and carried whole. Raises ConfigError naming `kind`, `alpha` or `teacher` when
    the settings do not fit the kind.
    """

    teacher: str | None
    student: str
    dataset: str
    train: TrainConfig | SFTConfig
    output_dir: str
    store_root: str
    device: str = "cpu"
    options: JobOptions = field(default_factory=JobOptions)
    kind: JobKind = "tvkd"

    def __post_init__(self) -> None:
        check_kind(self.kind, self.train)
        if self.kind == "sft" and self.teacher:
            raise ConfigError("teacher", "an 'sft' job has no teacher")

    @property
    def uses_teacher(self) -> bool:
        """Whether the job needs the teacher (and its value store)."""
        return isinstance(self.train, TrainConfig) and self.train.method.uses_teacher

    def settings(self) -> dict[str, Any]:
        """{"kind", "train": the training config as a (nested) dict, "options": JobOptions} (JSON)."""
        return self.kind_settings(self.kind, self.train, self.options)

    @staticmethod
    def kind_settings(kind: str, train: TrainConfig | SFTConfig, options: JobOptions) -> dict[str, Any]:
        """`settings()` of a job of `kind` with these configs (what a service job stores)."""
        return {"kind": kind, "train": train.to_dict(), "options": dataclasses.asdict(options)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        data = dict(data)
        kind = data.pop("kind", None) or "tvkd"
        train = data.pop("train", None) or {}
        options = data.pop("options", None) or {}
        if not isinstance(train, TrainConfig | SFTConfig):
            train = SFTConfig.from_dict(train) if kind == "sft" else TrainConfig.from_dict(train)
        return cls(
            train=train,
            options=options if isinstance(options, JobOptions) else JobOptions.from_dict(options),
            kind=kind,
            **data,
        )
