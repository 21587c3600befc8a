"""Context windows of models and the effective maximum length of a job.

A row is never run through a model past the positions that model was built or trained for: a
learned position table (GPT-2's `n_positions`) ends in an `IndexError`, a RoPE model
(`max_position_embeddings`) runs silently beyond its window. So the length a job tokenizes to
is the smaller of its `max_length` setting and the context windows of the student and the
teacher (`effective_max_length`); rows longer than that follow the job's `truncation_mode`
(TRL's names, see `tvkd.tokenize`) or are bad rows (code "too_long").

The window is read from the model's config only (no weights): the first positive integer of
`WINDOW_ATTRIBUTES`, on the config or its `text_config`. A config that declares none of them has
no known window and limits nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WINDOW_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class Window:
    """A model's context window: `tokens` positions, read from config attribute `attribute`."""

    tokens: int
    attribute: str


def config_window(config: Any) -> Window | None:
    """The context window a transformers config declares, or None when it declares none."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for attr in WINDOW_ATTRIBUTES:
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return Window(value, attr)
    return None


def model_window(name_or_path: str) -> Window | None:
    """`config_window` of a model folder (or hub id); raises `tvkd.models.ModelError` when its
    config cannot be loaded."""
    from tvkd.models import load_config

    return config_window(load_config(name_or_path))


@dataclass(frozen=True)
class LengthLimit:
    """The length a job tokenizes to: `max_length` = min(`requested`, each model's window);
    `limited_by` names the model (and its window) that lowered it, None when nothing did."""

    max_length: int
    requested: int
    limited_by: str | None = None

    def note(self) -> str | None:
        """A sentence for the job's events when a model window lowered `max_length`."""
        if self.limited_by is None:
            return None
        return (
            f"max_length {self.requested} exceeds the {self.limited_by}: rows are tokenized to at most "
            f"{self.max_length} tokens"
        )


def effective_max_length(requested: int, models: Mapping[str, str | None]) -> LengthLimit:
    """min(`requested`, the window of each model of `models` (role → folder; None skipped)).

    Raises `tvkd.models.ModelError` when a model's config cannot be loaded, ValueError when a
    window is shorter than 2 tokens (no prompt token and response token fit).
    """
    limit = LengthLimit(requested, requested)
    for role, path in models.items():
        if path is None:
            continue
        window = model_window(path)
        if window is None or window.tokens >= limit.max_length:
            continue
        if window.tokens < 2:
            raise ValueError(f"the {role} {path!r} has a context window of {window.tokens} tokens")
        limit = LengthLimit(
            window.tokens, requested, f"{role}'s context window ({window.attribute}={window.tokens})"
        )
    return limit
