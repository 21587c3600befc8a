"""Operator bounds on how big a job may be: run-size settings and model size, checked at submit.

tvkd's own config bounds say what is valid; these say what this deployment accepts. A job past one
is a 422 naming the field and the setting that sets the bound, before anything is queued:

- run size: `max_steps`, `epochs`, `batch_size`, `grad_accum` (TRL's
  gradient_accumulation_steps), `max_length`, `num_samples`, `num_processes` at most
  TVKD_LIMIT_<NAME>; `num_nodes` 1 (multi-node runs go through the library CLI, README 'Scaling');
- model size: a model folder's config.json, read as plain JSON (no weights, no code), may declare
  at most TVKD_MAX_MODEL_LAYERS layers and, by a closed-form estimate of its parameters
  (embeddings + per layer 4·H² attention + 3·H·I MLP), at most TVKD_MAX_MODEL_PARAMETERS; so a
  config with 200,000 layers is refused before any worker builds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.errors import invalid
from service.settings import Settings

# TrainConfig field → Settings attribute of its upper bound.
RUN_LIMITS = {
    "max_steps": "limit_max_steps",
    "epochs": "limit_epochs",
    "batch_size": "limit_batch_size",
    "grad_accum": "limit_grad_accum",
    "max_length": "limit_max_length",
    "num_samples": "limit_num_samples",
    "num_processes": "limit_num_processes",
}

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim")
_INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim")


def check_run_size(settings: Settings, train: dict[str, Any]) -> None:
    """422 naming `hyperparameters.<name>` when a run-size setting of `train` (TrainConfig as a
    dict) is over this deployment's bound."""
    nodes = train.get("num_nodes")
    if isinstance(nodes, int) and nodes > 1:
        raise invalid(
            "hyperparameters.num_nodes",
            f"{nodes} nodes: the service runs a job on one node (num_processes devices of one worker); "
            "run a multi-node job with the library CLI under a cluster scheduler (README 'Scaling')",
            code="over_limit",
        )
    for name, attr in RUN_LIMITS.items():
        bound = getattr(settings, attr)
        value = train.get(name)
        if isinstance(value, int | float) and value > bound:
            raise invalid(
                f"hyperparameters.{name}",
                f"{value} is over this server's limit of {bound:g} (TVKD_{attr.upper()})",
                code="over_limit",
            )


def _first_int(config: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def estimated_parameters(config: dict[str, Any]) -> tuple[int, int]:
    """(layers, estimated parameters) of a transformers config dict (its `text_config` when it
    has one); 0 for what it does not declare."""
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {**config, **text}
    layers = _first_int(config, _LAYERS) or 0
    hidden = _first_int(config, _HIDDEN) or 0
    inner = _first_int(config, _INTERMEDIATE) or 4 * hidden
    vocab = _first_int(config, ("vocab_size",)) or 0
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers, embeddings + layers * (4 * hidden * hidden + 3 * hidden * inner)


def check_model_size(settings: Settings, folder: Path, *, field: str) -> None:
    """422 naming `field` when the model folder's config declares more layers or (estimated)
    parameters than this deployment accepts, or cannot be read as JSON."""
    try:
        config = json.loads((folder / "config.json").read_bytes()[: 1 << 20])
    except (OSError, ValueError, RecursionError) as exc:
        raise invalid(
            field, f"its config.json is not readable JSON ({type(exc).__name__})", code="invalid_model"
        ) from exc
    if not isinstance(config, dict):
        raise invalid(field, "its config.json is not a JSON object", code="invalid_model")
    layers, params = estimated_parameters(config)
    if layers > settings.max_model_layers:
        raise invalid(
            field,
            f"the config declares {layers} layers, over this server's limit of {settings.max_model_layers} "
            "(TVKD_MAX_MODEL_LAYERS)",
            code="over_limit",
        )
    if params > settings.max_model_parameters:
        raise invalid(
            field,
            f"the config makes about {params:.3g} parameters, over this server's limit of "
            f"{settings.max_model_parameters:.3g} (TVKD_MAX_MODEL_PARAMETERS)",
            code="over_limit",
        )
