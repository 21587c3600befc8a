"""Configuration dataclasses (TRL style: every field carries a help string).

tvkd/config/job.py holds the job spec: `MethodConfig` (the TVKD options of MATH.md), `TrainConfig`
(the student training job; it embeds a `MethodConfig`), `SFTConfig` (supervised fine-tuning),
`split_settings` and `JobSpec`; options.py the `JobOptions` of every job; precompute.py the
teacher pass (`PrecomputeConfig`); choices.py the named choices. Each validates itself in
`__post_init__` and raises `ConfigError` naming the offending field, so bad settings fail before
any model is loaded.

Every field is declared once, with `_help(text, default=..., ge=/gt=/le=/lt=..., choices=...)`
(tvkd/config/fields.py): the help string, the bounds and the choices live in the field's metadata.
`config_fields(cls)` reads them back; the same declaration feeds the dataclass check, the API
schema (service/hyperparams.py), the CLI flags (tvkd/cli/train.py), the README table
(scripts/config_reference.py) and, through the OpenAPI document, the dashboard's form.
"""

from tvkd.config.choices import (
    JOB_KINDS,
    Q_SOURCES,
    REPORTERS,
    SHAPINGS,
    TERMINALS,
    TRUNCATIONS,
    JobKind,
    ParallelMode,
    QSource,
    Shaping,
    Terminal,
    Truncation,
)
from tvkd.config.fields import (
    BOUND_KEYS,
    ConfigError,
    ConfigField,
    _help,
    check_fields,
    config_fields,
    field_help,
)
from tvkd.config.job import (
    NOT_SFT_OPTIONS,
    SFT_EXCLUDED,
    JobSpec,
    MethodConfig,
    SFTConfig,
    TrainConfig,
    check_kind,
    flat_settings,
    require_teacher_reference,
    split_settings,
    split_sft_settings,
)
from tvkd.config.options import JobOptions
from tvkd.config.precompute import PrecomputeConfig

__all__ = [
    "BOUND_KEYS",
    "JOB_KINDS",
    "NOT_SFT_OPTIONS",
    "Q_SOURCES",
    "REPORTERS",
    "SFT_EXCLUDED",
    "SHAPINGS",
    "TERMINALS",
    "TRUNCATIONS",
    "ConfigError",
    "ConfigField",
    "JobKind",
    "JobOptions",
    "JobSpec",
    "MethodConfig",
    "ParallelMode",
    "PrecomputeConfig",
    "QSource",
    "SFTConfig",
    "Shaping",
    "Terminal",
    "TrainConfig",
    "Truncation",
    "_help",
    "check_fields",
    "check_kind",
    "config_fields",
    "field_help",
    "flat_settings",
    "require_teacher_reference",
    "split_settings",
    "split_sft_settings",
]
