"""Can the teacher's signals be put on the student's tokens? Checked before any weights load.

`check_alignment` is the validation side of training: it reads tokenizers and the value store's
manifest only, and raises `ConfigError` naming the setting to change when the job cannot use
the teacher: conversational data for a tokenizer without a chat template, an action-dependent
shaping mode (MATH.md, ψ from log-probs or logits) across different tokenizers, or a value
store computed with another value setting, other pairs or another tokenizer. The pipeline's
validate stage runs it; `Trainer.setup` runs it again on what it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tvkd.config import ConfigError, MethodConfig
from tvkd.data import PreferencePair, dataset_fingerprint
from tvkd.fingerprints import tokenizer_fingerprint
from tvkd.models import load_tokenizer
from tvkd.store import ValueStore
from tvkd.tokenize import needs_chat_template

ACTION_SHAPINGS = ("logprob", "logit")  # ψ needs the teacher's score of each student token


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


def check_store(method: MethodConfig, store: ValueStore | None, teacher: str | None) -> None:
    """Raise `ConfigError` when a run is given no value store but its method uses the teacher,
    or a store without the teacher it came from."""
    if method.uses_teacher and store is None:
        raise ConfigError(
            "alpha",
            f"the method uses the teacher (alpha={method.alpha}, shaping={method.shaping!r}) but "
            "no value store was given: precompute first, or train plain DPO (alpha=0)",
        )
    if store is not None and teacher is None:
        raise ConfigError("teacher", "a value store was given without the teacher it came from")


@dataclass(frozen=True)
class Tokenizers:
    """A run's tokenizers: the student's, and the teacher's when the run has a value store
    (`same`: whether the two are identical; None without a store)."""

    student: Any
    teacher: Any
    same: bool | None

    def pair_options(
        self, max_length: int, store: ValueStore | None, *, truncation_mode: str = "none"
    ) -> dict[str, Any]:
        """The keyword arguments of `tvkd.batch.build_train_pairs` for this run (`max_length`:
        the effective one, `tvkd.windows.effective_max_length`)."""
        return {
            "tokenizer": self.student,
            "max_length": max_length,
            "truncation_mode": truncation_mode,
            "store": store,
            "teacher_tokenizer": self.teacher,
            "same_tokenizer": bool(self.same),
        }


def load_tokenizers(
    method: MethodConfig,
    pairs: Sequence[PreferencePair],
    *,
    student: str,
    teacher: str | None,
    store: ValueStore | None,
) -> Tokenizers:
    """Load the run's tokenizers and `check_alignment` them against `pairs` and `store`
    (raises `ConfigError` as it does)."""
    student_tok = load_tokenizer(student)
    teacher_tok = load_tokenizer(teacher) if store is not None and teacher is not None else None
    same = check_alignment(
        method, pairs, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok, store=store
    )
    return Tokenizers(student_tok, teacher_tok, same if teacher_tok is not None else None)
