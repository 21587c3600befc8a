"""Preference data: load (prompt, chosen, rejected) pairs, report bad rows, tokenize exactly.

Loading (`load_pairs`) reads JSONL (optionally gzipped), a JSON list, Parquet, a Hugging Face
`datasets` folder (`save_to_disk`, or any local folder `datasets.load_dataset` understands) or a
hub id, and accepts these row forms:

- text: `prompt`, `chosen`, `rejected` strings;
- conversational (TRL conventions): (a) `prompt` a list of messages, `chosen`/`rejected` one
  assistant message (a one-element list or a plain string); (b) no prompt, `chosen`/`rejected`
  full message lists whose shared prefix is the prompt; (c) `messages` (the prompt turns) with
  `chosen`/`rejected` as in (a);
- Anthropic HH transcripts: `chosen`/`rejected` full dialogues; the prompt is everything up to and
  including the last "\\n\\nAssistant:" and must be identical in both. Afterwards it is text form.

Every bad row becomes a `RowIssue` (row, field, code, message); nothing is silently skipped.
Issue codes:

    missing_field   a required field is absent or null
    bad_type        a field has the wrong type (or a message is not {"role": str, "content": str})
    empty_response  a response is empty or whitespace only
    identical       chosen == rejected
    not_utf8        a JSONL line is not valid UTF-8
    bad_json        a JSONL line does not parse
    too_long        prompt + response exceed max_length tokens
    template        the row does not fit its dialogue structure: HH prompts that differ or no
                    Assistant turn, a response that is not exactly one assistant message, or a
                    chat template whose rendering does not round-trip

The work is split by idea: `tvkd.pairs` (the types, re-exported here), `tvkd.sources` (reading a
source into raw rows), `tvkd.rows` (the row forms) and `tvkd.tokenize` (tokenizing pairs
exactly, with content-offset ends). This module chains reading and parsing (`load_pairs`) and
fingerprints and splits the pairs.

Standard library only at import time: `datasets` and `pyarrow` are touched only when used, so
the service can validate data without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from tvkd.pairs import (
    FILE_ROW,
    ISSUE_CODES,
    SUMMARY_MAX_ISSUES,
    DataError,
    DataReport,
    OnError,
    PreferencePair,
    RowError,
    RowIssue,
    check_choice,
)
from tvkd.rows import FORMATS, HH_ASSISTANT, HH_HUMAN, parse_record, resolve_form
from tvkd.sources import read_source

__all__ = [
    "FILE_ROW",
    "FORMATS",
    "HH_ASSISTANT",
    "HH_HUMAN",
    "ISSUE_CODES",
    "SUMMARY_MAX_ISSUES",
    "DataError",
    "DataReport",
    "OnError",
    "PreferencePair",
    "RowError",
    "RowIssue",
    "dataset_fingerprint",
    "load_pairs",
    "split_pairs",
]


def load_pairs(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    format: str = "auto",
    on_error: OnError = "raise",
    limit: int | None = None,
) -> tuple[list[PreferencePair], DataReport]:
    """Load preference pairs from a file, a `datasets` folder or a hub id.

    `format` is "auto" (detected from the column names), "text", "conversational" or "hh".
    `limit` reads only the first `limit` rows of the source (bad rows included).
    Every row is checked; with on_error="raise" a `DataError` carrying the full report is raised
    if any row is bad, with "drop" the good pairs are returned and the report counts the rest.
    A source that cannot be read at all raises `DataError` (or FileNotFoundError) either way.
    """
    check_choice("format", format, FORMATS)
    check_choice("on_error", on_error, ("raise", "drop"))
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    raw = read_source(source, split, limit)
    form = resolve_form(format, raw)
    pairs: list[PreferencePair] = []
    issues = list(raw.issues)
    for row, record in raw.records:
        pair, row_issues = parse_record(form, row, record)
        issues.extend(row_issues)
        if pair is not None:
            pairs.append(pair)
    issues.sort(key=lambda issue: issue.row)  # stable: a row's issues keep their field order
    bad_rows = len({issue.row for issue in issues})
    report = DataReport(raw.name, raw.total, kept=len(pairs), dropped=bad_rows, issues=issues)
    if issues and on_error == "raise":
        raise DataError(report)
    return pairs, report


# --------------------------------------------------------------------------------------------
# Fingerprint and split


def _canonical(pair: PreferencePair) -> bytes:
    messages = None if pair.prompt_messages is None else [dict(m) for m in pair.prompt_messages]
    record = [pair.prompt, pair.chosen, pair.rejected, messages]
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def dataset_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """sha256 of the pairs' content, in order. `row` is provenance, not content: the same pairs
    read from a file with other line numbers give the same fingerprint (and reuse the same
    teacher values)."""
    digest = hashlib.sha256(b"tvkd-pairs-v1\n")
    for pair in pairs:
        digest.update(_canonical(pair))
        digest.update(b"\n")  # JSON escapes newlines, so this separator is unambiguous
    return digest.hexdigest()


def split_pairs(
    pairs: Sequence[PreferencePair], *, eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic (train, eval) split; both keep the input order.

    Pairs are ranked by a hash of (seed, content) rather than by a shuffled index, so the split
    does not depend on the Python version, and a pair stays on its side when others are added.
    With eval_fraction > 0 and at least 2 pairs, eval has at least 1 pair and train too.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    n = len(pairs)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))
    salt = f"{seed}\n".encode()
    ranked = sorted(range(n), key=lambda i: (hashlib.sha256(salt + _canonical(pairs[i])).digest(), i))
    held_out = set(ranked[:n_eval])
    train = [p for i, p in enumerate(pairs) if i not in held_out]
    evaluation = [p for i, p in enumerate(pairs) if i in held_out]
    return train, evaluation
