"""Preference data: load (prompt, chosen, rejected) pairs, report bad rows, tokenize exactly.

Loading (`load_pairs`) reads JSONL (optionally gzipped), a JSON list, Parquet, a Hugging Face
`datasets` folder (`save_to_disk`, or any local folder `datasets.load_dataset` understands) or a
hub id, and reads the public layouts without a conversion script (`tvkd.layouts`: TRL text and
conversational, explicit and implicit prompt; Anthropic HH; UltraFeedback-binarized; argilla
dpo-mix; Intel orca-dpo; OpenAI preference JSONL), detected from the columns or given as
`format`, with an optional column mapping. The report says which layout was read and why.

Every bad row becomes a `RowIssue` (row, field, code, message); nothing is silently skipped.
Issue codes:

    missing_field   a required field is absent or null
    bad_type        a field has the wrong type (a message that is not {"role": str, "content":
                    str, ...}, malformed tool calls or tools, a response that is a tool call)
    empty_response  a response is empty or whitespace only
    identical       chosen == rejected
    not_utf8        a JSONL line is not valid UTF-8
    bad_json        a JSONL line does not parse
    too_long        prompt + response exceed max_length tokens (and no truncation_mode cuts it)
    template        the row does not fit its dialogue structure: HH prompts that differ or no
                    Assistant turn, a response that is not exactly one assistant message, or a
                    chat template that fails, does not round-trip, or ignores tools/tool calls
    boundary        tokens merge across the prompt/response boundary (tokenize.py)
    special_token   a response holds its end-of-response token before its end
    round_trip      the tokens do not decode to the rendered text

The work is split by idea: `tvkd.pairs` (the types, re-exported here), `tvkd.sources` (reading a
source into raw rows), `tvkd.layouts` (which layout, column mappings), `tvkd.rows` (parsing a
row), `tvkd.templates` (chat templates) and `tvkd.tokenize` (tokenizing pairs exactly, with
content-offset ends). This module chains reading and parsing (`load_pairs`) and fingerprints and
splits the pairs.

Standard library only at import time: `datasets` and `pyarrow` are touched only when used, so
the service can validate data without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tvkd.layouts import FORMATS, LAYOUTS, map_columns, parse_columns, rename_issue, resolve_layout
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
from tvkd.rows import HH_ASSISTANT, HH_HUMAN, parse_record
from tvkd.sources import DEFAULT_LIMITS, ReadLimits, read_source
from tvkd.tokenize import TokenizedPair, tokenize_pair, tokenize_pairs

__all__ = [
    "FILE_ROW",
    "FORMATS",
    "HH_ASSISTANT",
    "HH_HUMAN",
    "ISSUE_CODES",
    "LAYOUTS",
    "SUMMARY_MAX_ISSUES",
    "DataError",
    "DataReport",
    "OnError",
    "PreferencePair",
    "RowError",
    "RowIssue",
    "TokenizedPair",
    "dataset_fingerprint",
    "load_pairs",
    "split_pairs",
    "tokenize_pair",
    "tokenize_pairs",
]


def load_pairs(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    format: str = "auto",
    columns: str | Mapping[str, str] | None = None,
    on_error: OnError = "raise",
    limit: int | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> tuple[list[PreferencePair], DataReport]:
    """Load preference pairs from a file, a `datasets` folder or a hub id.

    `format` is "auto" (detected from the columns; `report.layout`/`layout_reason` say which and
    why) or one of "text", "conversational", "hh", "orca", "openai" (`tvkd.layouts`). `columns`
    renames source columns first ("prompt=question,chosen=response_j", or a dict); issues then
    name the source's columns. `limit` reads only the first `limit` rows (bad rows included).
    Every row is checked; with on_error="raise" a `DataError` carrying the full report is raised
    if any row is bad, with "drop" the good pairs are returned and the report counts the rest.
    A source that cannot be read at all raises `DataError` (or FileNotFoundError) either way;
    a bad `format`, `columns` or `on_error` raises ValueError. `limits` bound the reading
    (`tvkd.sources.ReadLimits`: decompressed bytes, rows, line bytes, nesting depth); a source past
    one raises DataError with code "too_large", a row nested too deep is a bad row ("too_deep").
    """
    check_choice("format", format, FORMATS)
    check_choice("on_error", on_error, ("raise", "drop"))
    mapping = parse_columns(columns)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    raw = read_source(source, split, limit, limits)
    map_columns(raw, mapping)
    layout = resolve_layout(format, raw)
    pairs: list[PreferencePair] = []
    issues = list(raw.issues)
    for row, record in raw.records:
        pair, row_issues = parse_record(layout.name, row, record)
        issues.extend(rename_issue(issue, mapping) for issue in row_issues)
        if pair is not None:
            pairs.append(pair)
    issues.sort(key=lambda issue: issue.row)  # stable: a row's issues keep their field order
    bad_rows = len({issue.row for issue in issues})
    report = DataReport(
        raw.name,
        raw.total,
        kept=len(pairs),
        dropped=bad_rows,
        issues=issues,
        layout=layout.name,
        layout_reason=layout.reason,
    )
    if issues and on_error == "raise":
        raise DataError(report)
    return pairs, report


# --------------------------------------------------------------------------------------------
# Fingerprint and split


def _canonical(pair: PreferencePair) -> bytes:
    messages = None if pair.prompt_messages is None else [dict(m) for m in pair.prompt_messages]
    record: list[Any] = [pair.prompt, pair.chosen, pair.rejected, messages]
    if pair.tools is not None:  # only then, so pairs without tools keep their fingerprints
        record.append([dict(t) for t in pair.tools])
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
