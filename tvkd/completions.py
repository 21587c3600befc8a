"""Supervised fine-tuning data: (prompt, completion) examples from either of two row forms.

- prompt/completion rows (TRL's prompt-completion form): `prompt` a string and `completion` a
  string, or `prompt` a list of messages and `completion` one assistant message (a list of one,
  a message object, or a string); an optional `tools` column as in preference data;
- preference rows of any layout `tvkd.data.load_pairs` reads: the chosen response is the
  completion (the paper's SFT stage trains on the chosen responses).

An example is a `PreferencePair` whose `rejected` equals its `chosen` (the completion), so the
tokenization, chat templates, fingerprints and splits of preference data apply unchanged
(`tvkd.tokenize.tokenize_pair` gives the completion's ids as `chosen_ids`). Bad rows are
`RowIssue`s naming row and field, as for preference data (`tvkd.data`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from tvkd.data import load_pairs
from tvkd.pairs import DataError, DataReport, OnError, PreferencePair, RowIssue, check_choice
from tvkd.rows import _as_messages, _get_response, _tools
from tvkd.sources import read_source

COMPLETION_LAYOUT = "prompt_completion"


def is_completion_source(columns: set[str]) -> bool:
    """True when rows carry a `completion` column (and so are read as prompt/completion)."""
    return "completion" in columns


def _parse(row: int, record: Any) -> tuple[PreferencePair | None, list[RowIssue]]:
    issues: list[RowIssue] = []
    if not isinstance(record, Mapping):
        return None, [RowIssue(row, "<row>", "bad_type", f"expected an object, got {type(record).__name__}")]
    prompt = record.get("prompt")
    completion = _get_response(record, row, "completion", issues)
    messages = None
    if prompt is None:
        issues.append(RowIssue(row, "prompt", "missing_field", "missing field 'prompt'"))
    elif isinstance(prompt, list | tuple):
        messages = _as_messages(prompt, row, "prompt", issues)
        if messages is not None and not messages:
            issues.append(RowIssue(row, "prompt", "missing_field", "the prompt has no messages"))
    elif not isinstance(prompt, str):
        kind = type(prompt).__name__
        issues.append(RowIssue(row, "prompt", "bad_type", f"expected a string or messages, got {kind}"))
    tools = _tools(record, row, "tools", issues)
    if completion is not None and not completion.strip():
        issues.append(RowIssue(row, "completion", "empty_response", "completion is empty or whitespace"))
    if issues or completion is None:
        return None, issues
    text = "" if messages is not None else str(prompt)
    return PreferencePair(row, text, completion, completion, messages, tools), []


def load_completions(
    source: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    limit: int | None = None,
) -> tuple[list[PreferencePair], DataReport]:
    """SFT examples of `source` (see the module docstring) and the report of what was read.

    A source with a `completion` column is read as prompt/completion rows (`report.layout` is
    "prompt_completion"); any other as preference rows, keeping the chosen response. Raises
    DataError (bad rows with on_error="raise", or an unreadable source), FileNotFoundError.
    """
    check_choice("on_error", on_error, ("raise", "drop"))
    raw = read_source(source, "train", limit)
    if not is_completion_source(raw.columns):
        pairs, report = load_pairs(source, on_error=on_error, limit=limit)
        examples = [dataclasses.replace(p, rejected=p.chosen) for p in pairs]
        report.layout_reason = f"{report.layout_reason}; SFT on the chosen responses"
        return examples, report
    examples: list[PreferencePair] = []
    issues = list(raw.issues)
    for row, record in raw.records:
        example, row_issues = _parse(row, record)
        issues.extend(row_issues)
        if example is not None:
            examples.append(example)
    issues.sort(key=lambda issue: issue.row)
    report = DataReport(
        raw.name,
        raw.total,
        kept=len(examples),
        dropped=len({issue.row for issue in issues}),
        issues=issues,
        layout=COMPLETION_LAYOUT,
        layout_reason="a 'completion' column: prompt/completion rows (TRL prompt-completion form)",
    )
    if issues and on_error == "raise":
        raise DataError(report)
    return examples, report
