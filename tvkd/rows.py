"""Row forms: turning one raw record into a `PreferencePair`, or into the issues that say why not.

A source resolves to one form from its column names (`resolve_form`): text (`prompt`,
`chosen`, `rejected` strings), TRL's three conversational layouts, or Anthropic HH transcripts
(see `tvkd.data` for the forms and the issue codes). `parse_record` checks one row against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tvkd.pairs import Message, PreferencePair, RowIssue, file_error
from tvkd.sources import RawRows

FORMATS = ("auto", "text", "conversational", "hh")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

# The concrete form a source resolves to ("conversational" splits into TRL's three layouts).
Form = Literal["text", "conv_prompt", "conv_full", "conv_messages", "hh"]


def _first_value(raw: RawRows, key: str) -> Any:
    for _, record in raw.records:
        if isinstance(record, dict) and record.get(key) is not None:
            return record[key]
    return None


def resolve_form(format: str, raw: RawRows) -> Form:
    """One form per source, from its column names (and, where names are not enough, the type of
    the first value): a row that does not fit the source's form is a bad row, not a new form."""
    cols = raw.columns
    if raw.records and cols and not cols & {"chosen", "rejected"}:
        raise file_error(raw.name, "missing_field", f"no 'chosen'/'rejected' columns (found {sorted(cols)})")
    if format == "text":
        return "text"
    if format == "hh":
        return "hh"
    if "messages" in cols:
        return "conv_messages"
    if "prompt" in cols:
        if format == "conversational" or isinstance(_first_value(raw, "prompt"), list):
            return "conv_prompt"
        return "text"
    if format == "conversational" or isinstance(_first_value(raw, "chosen"), list):
        return "conv_full"
    return "hh"


def parse_record(form: Form, row: int, record: Any) -> tuple[PreferencePair | None, list[RowIssue]]:
    """The pair of one raw record in the source's form, or None and every issue of the row."""
    if not isinstance(record, dict):
        kind = type(record).__name__
        return None, [RowIssue(row, "<row>", "bad_type", f"expected an object, got {kind}")]
    parser = {
        "text": _parse_text,
        "hh": _parse_hh,
        "conv_prompt": _parse_conv_prompt,
        "conv_messages": _parse_conv_prompt,
        "conv_full": _parse_conv_full,
    }[form]
    prompt_key = "messages" if form == "conv_messages" else "prompt"
    issues: list[RowIssue] = []
    pair = parser(row, record, issues, prompt_key)
    return (None if issues else pair), issues


def _get_str(record: Mapping[str, Any], row: int, name: str, issues: list[RowIssue]) -> str | None:
    value = record.get(name)
    if value is None:
        issues.append(RowIssue(row, name, "missing_field", f"missing field {name!r}"))
        return None
    if not isinstance(value, str):
        issues.append(RowIssue(row, name, "bad_type", f"expected a string, got {type(value).__name__}"))
        return None
    return value


def _finish(
    row: int,
    prompt: str,
    chosen: str,
    rejected: str,
    messages: tuple[Message, ...] | None,
    issues: list[RowIssue],
) -> PreferencePair | None:
    """The checks every form shares once its fields are extracted: non-empty, not identical."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            issues.append(RowIssue(row, name, "empty_response", "response is empty or whitespace"))
    if not issues and chosen == rejected:
        issues.append(RowIssue(row, "rejected", "identical", "chosen and rejected are identical"))
    if issues:
        return None
    return PreferencePair(row, prompt, chosen, rejected, messages)


def _parse_text(
    row: int, record: Mapping[str, Any], issues: list[RowIssue], prompt_key: str
) -> PreferencePair | None:
    prompt = _get_str(record, row, prompt_key, issues)
    chosen = _get_str(record, row, "chosen", issues)
    rejected = _get_str(record, row, "rejected", issues)
    if prompt is None or chosen is None or rejected is None:
        return None
    return _finish(row, prompt, chosen, rejected, None, issues)


def _parse_hh(
    row: int, record: Mapping[str, Any], issues: list[RowIssue], prompt_key: str
) -> PreferencePair | None:
    chosen = _get_str(record, row, "chosen", issues)
    rejected = _get_str(record, row, "rejected", issues)
    if chosen is None or rejected is None:
        return None
    parts = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        cut = text.rfind(HH_ASSISTANT)
        if cut < 0:
            issues.append(RowIssue(row, name, "template", "no '\\n\\nAssistant:' turn"))
        else:
            cut += len(HH_ASSISTANT)
            parts[name] = (text[:cut], text[cut:])
    if issues:
        return None
    prompt = parts["chosen"][0]
    if prompt != parts["rejected"][0]:
        # In the real HH data this happens when a response itself contains an "Assistant:"
        # turn, so "the last Assistant turn" is not the same point in both transcripts.
        issues.append(
            RowIssue(
                row,
                "prompt",
                "template",
                "chosen and rejected differ before their last '\\n\\nAssistant:' "
                "(the shared prompt must be identical)",
            )
        )
        return None
    return _finish(row, prompt, parts["chosen"][1], parts["rejected"][1], None, issues)


def _as_messages(value: Any, row: int, name: str, issues: list[RowIssue]) -> tuple[Message, ...] | None:
    """Validate a message list; keep only role and content (extra keys such as `name` or the
    nulls `datasets` adds for ragged structs do not reach the template)."""
    if value is None:
        issues.append(RowIssue(row, name, "missing_field", f"missing field {name!r}"))
        return None
    if not isinstance(value, (list, tuple)):
        kind = type(value).__name__
        issues.append(RowIssue(row, name, "bad_type", f"expected a list of messages, got {kind}"))
        return None
    messages: list[Message] = []
    for k, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            issues.append(RowIssue(row, f"{name}[{k}]", "bad_type", "expected {'role': str, 'content': str}"))
            return None
        messages.append({"role": message["role"], "content": message["content"]})
    return tuple(messages)


def _single_assistant(messages: Sequence[Message], row: int, name: str, issues: list[RowIssue]) -> str | None:
    """A response must be exactly one assistant message; several trailing assistant messages
    have no single content string to score, so they are a bad row rather than a guess."""
    if not messages:
        issues.append(RowIssue(row, name, "empty_response", "no assistant message"))
        return None
    if len(messages) > 1:
        issues.append(
            RowIssue(
                row,
                name,
                "template",
                f"{len(messages)} messages in the response; expected exactly one assistant message",
            )
        )
        return None
    if messages[0]["role"] != "assistant":
        role = messages[0]["role"]
        issues.append(RowIssue(row, name, "template", f"response role is {role!r}, not 'assistant'"))
        return None
    return messages[0]["content"]


def _get_response(record: Mapping[str, Any], row: int, name: str, issues: list[RowIssue]) -> str | None:
    value = record.get(name)
    if isinstance(value, str):
        return value
    messages = _as_messages(value, row, name, issues)
    return None if messages is None else _single_assistant(messages, row, name, issues)


def _parse_conv_prompt(
    row: int, record: Mapping[str, Any], issues: list[RowIssue], prompt_key: str
) -> PreferencePair | None:
    """Layouts (a) `prompt` and (c) `messages`: prompt turns plus one response per side."""
    prompt = _as_messages(record.get(prompt_key), row, prompt_key, issues)
    if prompt is not None and not prompt:
        issues.append(RowIssue(row, prompt_key, "missing_field", "the prompt has no messages"))
    chosen = _get_response(record, row, "chosen", issues)
    rejected = _get_response(record, row, "rejected", issues)
    if issues or prompt is None or chosen is None or rejected is None:
        return None
    return _finish(row, "", chosen, rejected, prompt, issues)


def _parse_conv_full(
    row: int, record: Mapping[str, Any], issues: list[RowIssue], prompt_key: str
) -> PreferencePair | None:
    """Layout (b): full conversations; the prompt is their longest shared prefix."""
    chosen = _as_messages(record.get("chosen"), row, "chosen", issues)
    rejected = _as_messages(record.get("rejected"), row, "rejected", issues)
    if chosen is None or rejected is None:
        return None
    if chosen == rejected:
        issues.append(RowIssue(row, "rejected", "identical", "chosen and rejected are identical"))
        return None
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not prompt:
        issues.append(RowIssue(row, "prompt", "template", "chosen and rejected share no prompt"))
    elif prompt[-1]["role"] == "assistant":
        issues.append(
            RowIssue(
                row,
                "prompt",
                "template",
                "the shared prefix ends with an assistant message (the responses span several "
                "assistant messages)",
            )
        )
    contents = [
        _single_assistant(side[shared:], row, name, issues)
        for name, side in (("chosen", chosen), ("rejected", rejected))
    ]
    if issues or contents[0] is None or contents[1] is None:
        return None
    return _finish(row, "", contents[0], contents[1], prompt, issues)
