"""Dataset layouts: which public preference layout a source is, and why; column mappings.

One layout per source, detected from its column names and the type of their first values (or
given as `format`); a row that does not fit the source's layout is a bad row, not a new layout.

    layout                    columns                                          format
    text                      prompt, chosen, rejected: strings (TRL standard)  text
    text_implicit             chosen, rejected: strings sharing the prompt      text
    hh                        chosen, rejected: Anthropic HH transcripts        hh
    conversational            prompt: messages; chosen/rejected: one assistant  conversational
                              message (a list of one, or a string)
    conversational_implicit   chosen/rejected: whole conversations sharing the  conversational
                              prompt turns (TRL implicit prompt; argilla dpo-mix; UltraFeedback-
                              binarized, whose string `prompt` and `messages` columns are not read)
    conversational_messages   messages: the prompt turns; chosen/rejected as    conversational
                              in `conversational`
    orca                      system (optional), question, chosen, rejected     orca
                              (Intel/orca_dpo_pairs)
    openai                    input.messages (+ input.tools), preferred_output, openai
                              non_preferred_output (OpenAI preference fine-tuning JSONL)

A column mapping (`columns`, "prompt=question,chosen=response_j" or a dict) renames source
columns to these names first; a source may be a dotted path into an object ("input.messages").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tvkd.pairs import RowIssue, file_error
from tvkd.sources import RawRows

FORMATS = ("auto", "text", "conversational", "hh", "orca", "openai")
LAYOUTS = (
    "text",
    "text_implicit",
    "hh",
    "conversational",
    "conversational_implicit",
    "conversational_messages",
    "orca",
    "openai",
)
# The names a column mapping may give a source column.
COLUMN_NAMES = ("prompt", "chosen", "rejected", "messages", "tools", "system", "question")
OPENAI_COLUMNS = ("input", "preferred_output", "non_preferred_output")
HH_MARKERS = ("\n\nHuman:", "\n\nAssistant:")


@dataclass(frozen=True)
class Layout:
    """The layout a source is read as (one of LAYOUTS) and, in words, why."""

    name: str
    reason: str


def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """{name: source column} from "name=source,..." or a mapping; ValueError naming the entry
    when a name is not one of COLUMN_NAMES, or an entry is malformed or repeated."""
    if not columns:
        return {}
    if isinstance(columns, str):
        items = []
        for part in columns.split(","):
            name, sep, source = part.partition("=")
            if not sep or not name.strip() or not source.strip():
                raise ValueError(f"columns: {part!r} is not NAME=SOURCE (e.g. prompt=question)")
            items.append((name.strip(), source.strip()))
    else:
        items = list(columns.items())
    out: dict[str, str] = {}
    for name, source in items:
        if name not in COLUMN_NAMES:
            raise ValueError(f"columns: {name!r} is not one of {', '.join(COLUMN_NAMES)}")
        if not isinstance(source, str) or not source:
            raise ValueError(f"columns: the source of {name!r} must be a column name; got {source!r}")
        if name in out:
            raise ValueError(f"columns: {name!r} is mapped twice")
        out[name] = source
    return out


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def map_columns(raw: RawRows, columns: Mapping[str, str]) -> None:
    """Rename the source columns of `raw` in place (see `parse_columns`). A source column that
    no row has is an error of the whole source (DataError naming it)."""
    if not columns or not raw.records:
        return
    for name, source in columns.items():
        if source not in raw.columns and source.split(".")[0] not in raw.columns:
            raise file_error(
                raw.name,
                "missing_field",
                f"column {source!r} (mapped to {name!r}) is not in the source; "
                f"its columns are {sorted(raw.columns)}",
            )
    sources = {s.split(".")[0] if s not in raw.columns else s for s in columns.values()}
    drop = set(columns) | sources
    for k, (row, record) in enumerate(raw.records):
        if isinstance(record, Mapping):
            mapped = {key: value for key, value in record.items() if key not in drop}
            mapped.update({name: _lookup(record, source) for name, source in columns.items()})
            raw.records[k] = (row, mapped)
    raw.columns = (raw.columns - drop) | set(columns)


def source_field(field: str, columns: Mapping[str, str]) -> str:
    """An issue's field in the source's own names ("prompt[2]" → "question[2]" under prompt=question)."""
    for name, source in columns.items():
        if field == name or field.startswith((name + "[", name + ".")):
            return source + field[len(name) :]
    return field


def _first(raw: RawRows, key: str) -> Any:
    for _, record in raw.records:
        if isinstance(record, Mapping) and record.get(key) is not None:
            return record[key]
    return None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], Mapping)


def _whole_conversation(value: Any) -> bool:
    """A message list that holds more than the assistant's answer (the prompt turns too)."""
    return _is_messages(value) and (len(value) > 1 or value[0].get("role") != "assistant")


def resolve_layout(format: str, raw: RawRows) -> Layout:
    """The layout of `raw` for `format` ("auto" or one of FORMATS). Raises DataError for a
    source that has none of the columns a layout needs, or that contradicts `format`."""
    cols = raw.columns
    if raw.records and cols and not cols & {"chosen", "rejected", *OPENAI_COLUMNS}:
        raise file_error(raw.name, "missing_field", f"no 'chosen'/'rejected' columns (found {sorted(cols)})")
    chosen = _first(raw, "chosen")
    if format == "openai" or (format == "auto" and {"preferred_output", "non_preferred_output"} <= cols):
        missing = [c for c in OPENAI_COLUMNS if c not in cols]
        if missing and raw.records:
            raise file_error(raw.name, "missing_field", f"the openai layout needs the columns {missing}")
        return Layout(
            "openai",
            "columns 'input', 'preferred_output' and 'non_preferred_output' "
            "(OpenAI preference fine-tuning JSONL): the prompt is input.messages (and input.tools)",
        )
    if format in ("text", "hh", "orca") and _is_messages(chosen):
        raise file_error(
            raw.name,
            "bad_type",
            f"format {format!r} needs strings in 'chosen'/'rejected', and this source holds message "
            "lists: use format 'conversational' (or 'auto')",
        )
    if format == "orca" or (format == "auto" and "question" in cols and "prompt" not in cols):
        if "question" not in cols and raw.records:
            raise file_error(raw.name, "missing_field", "the orca layout needs a 'question' column")
        return Layout(
            "orca",
            "columns 'question', 'chosen', 'rejected' (and 'system'), as Intel/orca_dpo_pairs: "
            "the prompt is the system and user turns",
        )
    if format == "hh":
        return Layout(
            "hh", "format 'hh': Anthropic HH transcripts, the prompt ends at the last '\\n\\nAssistant:'"
        )
    if format == "conversational" or (
        format == "auto"
        and any(_is_messages(v) for v in (chosen, _first(raw, "prompt"), _first(raw, "messages")))
    ):
        return _conversational(raw, format)
    layout = _text(raw, format, chosen)
    if format == "auto" and not cols:  # nothing to detect from: say so instead of a guessed reason
        what = "no rows" if not raw.total else "no row that is a JSON object"
        return Layout(layout.name, f"{what} to detect a layout from; read as {layout.name}")
    return layout


def _conversational(raw: RawRows, format: str) -> Layout:
    why = "format 'conversational'" if format == "conversational" else "message lists"
    prompt, chosen = _first(raw, "prompt"), _first(raw, "chosen")
    if _is_messages(prompt):
        return Layout(
            "conversational", f"{why}: 'prompt' holds the prompt turns (TRL conversational, explicit prompt)"
        )
    if _whole_conversation(chosen):
        if isinstance(prompt, str):
            unread = "'prompt'" + (" and 'messages' are" if "messages" in raw.columns else " is")
            return Layout(
                "conversational_implicit",
                f"{why}: 'chosen'/'rejected' are whole conversations and 'prompt' a string "
                f"(UltraFeedback-binarized): the prompt is their shared turns, as TRL's maybe_extract_prompt "
                f"does; {unread} not read",
            )
        return Layout(
            "conversational_implicit",
            f"{why}: 'chosen'/'rejected' are whole conversations (TRL implicit prompt, argilla dpo-mix): "
            "the prompt is their shared turns",
        )
    if "messages" in raw.columns:
        return Layout("conversational_messages", f"{why}: 'messages' holds the prompt turns")
    if "prompt" in raw.columns:
        return Layout(
            "conversational", f"{why}: 'prompt' holds the prompt turns (TRL conversational, explicit prompt)"
        )
    return Layout("conversational_implicit", f"{why}: no 'prompt' column: the prompt is the shared turns")


def _text(raw: RawRows, format: str, chosen: Any) -> Layout:
    why = "format 'text'" if format == "text" else "strings"
    if "prompt" in raw.columns:
        return Layout("text", f"{why}: 'prompt', 'chosen', 'rejected' (TRL standard, explicit prompt)")
    if format == "auto" and isinstance(chosen, str) and all(m in chosen for m in HH_MARKERS):
        return Layout(
            "hh",
            "'chosen'/'rejected' are '\\n\\nHuman:'/'\\n\\nAssistant:' transcripts "
            "(Anthropic HH): the prompt ends at the last '\\n\\nAssistant:'",
        )
    return Layout(
        "text_implicit",
        f"{why} without a 'prompt' column (TRL standard, implicit prompt): the prompt is the shared "
        "beginning of 'chosen' and 'rejected', ending before the word where they differ",
    )


def rename_issue(issue: RowIssue, columns: Mapping[str, str]) -> RowIssue:
    field = source_field(issue.field, columns)
    return issue if field == issue.field else RowIssue(issue.row, field, issue.code, issue.message)
