"""The content key of a value store (`tvkd.store`): a hash of everything that changes the stored
numbers (teacher weights, tokenizer and chat template, dataset, max length, q_source, β_v, top-k,
token stats, precision) and nothing else, so the same request finds the same folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tvkd.config import PrecomputeConfig

STORE_FORMAT = 1


def content_key(fields: Mapping[str, object]) -> str:
    """sha256 of the canonical JSON of `fields` (+ the store format) → 32 hex characters."""
    payload = {"store_format": STORE_FORMAT, **fields}
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def key_fields(
    *,
    teacher: str,
    teacher_fingerprint: str,
    tokenizer_fingerprint: str,
    dataset_fingerprint: str,
    config: PrecomputeConfig,
    teacher_reference: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Everything that changes the stored numbers, and nothing else.

    batch_tokens, chunk_size and shard_size only change float summation order (and the file
    split), so they stay out: a rerun with a bigger batch finds the same store. bf16 changes the
    teacher's hidden states well beyond float noise, so the precision is in. `teacher_reference`
    (name, weights fingerprint) is in with `q_source="implicit"` (the values are the teacher's
    log-ratio to it). The training-time options γ, terminal and shaping are not: they are applied
    to the stored V when the loss is formed, so one store serves them all. truncation_mode is in
    only when it cuts rows ("none" leaves the keys of earlier stores as they were).
    """
    reference = {}
    if teacher_reference is not None:
        name, fingerprint = teacher_reference
        reference = {"teacher_reference": name, "teacher_reference_fingerprint": fingerprint}
    cut = {} if config.truncation_mode == "none" else {"truncation_mode": config.truncation_mode}
    return {
        **reference,
        **cut,
        "teacher": str(teacher),
        "teacher_fingerprint": teacher_fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "max_length": int(config.max_length),
        "q_source": config.q_source,
        # float() so that value_beta=1 and value_beta=1.0 hash alike
        "value_beta": float(config.value_beta),
        "topk": int(config.topk),
        "token_stats": bool(config.token_stats),
        "precision": "bf16" if config.bf16 else "fp32",
    }
