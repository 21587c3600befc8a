"""Row forms: turning one raw record into a `PreferencePair`, or into the issues that say why not.

`parse_record(layout, row, record)` checks one row against its source's layout (`tvkd.layouts`).
Messages keep everything a chat template may render (`tool_calls`, `name`, `tool_call_id`, ...;
`content` may be null on an assistant turn with tool calls, the OpenAI/TRL convention); a row's
`tools` (a list, or a JSON string of one) go with it. A response is one assistant text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tvkd.pairs import Message, PreferencePair, RowIssue

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Parser = Callable[[int, Mapping[str, Any], list[RowIssue]], PreferencePair | None]


def parse_record(layout: str, row: int, record: Any) -> tuple[PreferencePair | None, list[RowIssue]]:
    """The pair of one raw record in the source's layout, or None and every issue of the row."""
    if not isinstance(record, Mapping):
        kind = type(record).__name__
        return None, [RowIssue(row, "<row>", "bad_type", f"expected an object, got {kind}")]
    issues: list[RowIssue] = []
    pair = PARSERS[layout](row, record, issues)
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
    tools: tuple[dict[str, Any], ...] | None = None,
) -> PreferencePair | None:
    """The checks every form shares once its fields are extracted: non-empty, not identical."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            issues.append(RowIssue(row, name, "empty_response", "response is empty or whitespace"))
    if not issues and chosen == rejected:
        issues.append(RowIssue(row, "rejected", "identical", "chosen and rejected are identical"))
    if issues:
        return None
    return PreferencePair(row, prompt, chosen, rejected, messages, tools)


def _no_tools_in_text(record: Mapping[str, Any], row: int, issues: list[RowIssue]) -> None:
    if record.get("tools"):
        issues.append(
            RowIssue(
                row, "tools", "bad_type", "tools need conversational rows (a chat template renders them)"
            )
        )


# --------------------------------------------------------------------------------------------
# Text layouts


def _parse_text(row: int, record: Mapping[str, Any], issues: list[RowIssue]) -> PreferencePair | None:
    prompt = _get_str(record, row, "prompt", issues)
    chosen = _get_str(record, row, "chosen", issues)
    rejected = _get_str(record, row, "rejected", issues)
    _no_tools_in_text(record, row, issues)
    if prompt is None or chosen is None or rejected is None:
        return None
    return _finish(row, prompt, chosen, rejected, None, issues)


def _shared_text_prefix(chosen: str, rejected: str) -> int:
    """Where the implicit prompt ends: the common prefix, moved back to the start of the word
    where the texts differ and before the space in front of it (TRL's extract_prompt moves back
    over that space only), so the responses start with " word" and no token straddles the cut."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and (chosen[k - 1].isalnum() or chosen[k - 1] == "_"):
        k -= 1
    while k > 0 and chosen[k - 1] in " \t":
        k -= 1
    return k


def _parse_text_implicit(
    row: int, record: Mapping[str, Any], issues: list[RowIssue]
) -> PreferencePair | None:
    chosen = _get_str(record, row, "chosen", issues)
    rejected = _get_str(record, row, "rejected", issues)
    _no_tools_in_text(record, row, issues)
    if chosen is None or rejected is None:
        return None
    if chosen == rejected:
        issues.append(RowIssue(row, "rejected", "identical", "chosen and rejected are identical"))
        return None
    cut = _shared_text_prefix(chosen, rejected)
    if cut == 0:
        issues.append(RowIssue(row, "prompt", "template", "chosen and rejected share no prompt"))
        return None
    return _finish(row, chosen[:cut], chosen[cut:], rejected[cut:], None, issues)


def _parse_hh(row: int, record: Mapping[str, Any], issues: list[RowIssue]) -> PreferencePair | None:
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


# --------------------------------------------------------------------------------------------
# Messages


def _tool_calls_ok(calls: Any) -> bool:
    if not isinstance(calls, list | tuple) or not calls:
        return False
    for call in calls:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not (isinstance(function, Mapping) and isinstance(function.get("name"), str)):
            return False
    return True


def _message(value: Any, row: int, field: str, issues: list[RowIssue]) -> Message | None:
    """One validated message: every key that is not null (`datasets` fills ragged structs with
    nulls), `content` null only beside `tool_calls`."""
    if not (isinstance(value, Mapping) and isinstance(value.get("role"), str)):
        issues.append(
            RowIssue(row, field, "bad_type", "expected a message {'role': str, 'content': str, ...}")
        )
        return None
    message = {k: v for k, v in value.items() if v is not None}
    calls = message.get("tool_calls")
    if calls is not None and not _tool_calls_ok(calls):
        issues.append(
            RowIssue(
                row,
                f"{field}.tool_calls",
                "bad_type",
                "expected a list of tool calls "
                "[{'type': 'function', 'function': {'name': str, 'arguments': ...}}]",
            )
        )
        return None
    content = value.get("content")
    if content is None and calls is not None:
        message["content"] = None  # the OpenAI/TRL convention: templates test it, so it stays
    elif not isinstance(content, str):
        got = "null" if content is None else type(content).__name__
        issues.append(
            RowIssue(
                row,
                f"{field}.content",
                "bad_type",
                f"expected a string (null only with tool_calls); got {got}",
            )
        )
        return None
    return message


def _as_messages(value: Any, row: int, name: str, issues: list[RowIssue]) -> tuple[Message, ...] | None:
    if value is None:
        issues.append(RowIssue(row, name, "missing_field", f"missing field {name!r}"))
        return None
    if not isinstance(value, list | tuple):
        kind = type(value).__name__
        issues.append(RowIssue(row, name, "bad_type", f"expected a list of messages, got {kind}"))
        return None
    messages = [_message(m, row, f"{name}[{k}]", issues) for k, m in enumerate(value)]
    if any(m is None for m in messages):
        return None
    return tuple(m for m in messages if m is not None)


def _tools(
    record: Mapping[str, Any], row: int, name: str, issues: list[RowIssue], key: str = "tools"
) -> tuple[dict[str, Any], ...] | None:
    """A row's tool definitions: a list of objects, or a JSON string of one (TRL reads both)."""
    value = record.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            issues.append(RowIssue(row, name, "bad_type", f"tools is a string but not JSON: {exc.msg}"))
            return None
    if value is None or (isinstance(value, list | tuple) and not value):
        return None
    if not (isinstance(value, list | tuple) and all(isinstance(t, Mapping) for t in value)):
        issues.append(RowIssue(row, name, "bad_type", "expected a list of tool definitions (objects)"))
        return None
    return tuple(dict(t) for t in value)


def _single_assistant(messages: Sequence[Message], row: int, name: str, issues: list[RowIssue]) -> str | None:
    """A response must be exactly one assistant message with text; several trailing messages
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
    message = messages[0]
    if message["role"] != "assistant":
        issues.append(
            RowIssue(row, name, "template", f"response role is {message['role']!r}, not 'assistant'")
        )
        return None
    if message.get("tool_calls"):
        issues.append(
            RowIssue(
                row,
                name,
                "bad_type",
                "a response must be assistant text: tool calls are supported in the prompt, "
                "not as the response",
            )
        )
        return None
    return message["content"]


def _get_response(record: Mapping[str, Any], row: int, name: str, issues: list[RowIssue]) -> str | None:
    value = record.get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    messages = _as_messages(value, row, name, issues)
    return None if messages is None else _single_assistant(messages, row, name, issues)


def _conv_prompt(
    row: int, record: Mapping[str, Any], issues: list[RowIssue], prompt: tuple[Message, ...] | None, key: str
) -> PreferencePair | None:
    if prompt is not None and not prompt:
        issues.append(RowIssue(row, key, "missing_field", "the prompt has no messages"))
    chosen = _get_response(record, row, "chosen", issues)
    rejected = _get_response(record, row, "rejected", issues)
    tools = _tools(record, row, "tools", issues)
    if issues or prompt is None or chosen is None or rejected is None:
        return None
    return _finish(row, "", chosen, rejected, prompt, issues, tools)


def _parse_conversational(
    row: int, record: Mapping[str, Any], issues: list[RowIssue]
) -> PreferencePair | None:
    """TRL explicit prompt: `prompt` messages plus one response per side."""
    return _conv_prompt(
        row, record, issues, _as_messages(record.get("prompt"), row, "prompt", issues), "prompt"
    )


def _parse_conv_messages(
    row: int, record: Mapping[str, Any], issues: list[RowIssue]
) -> PreferencePair | None:
    return _conv_prompt(
        row, record, issues, _as_messages(record.get("messages"), row, "messages", issues), "messages"
    )


def _parse_orca(row: int, record: Mapping[str, Any], issues: list[RowIssue]) -> PreferencePair | None:
    """Intel/orca_dpo_pairs: a system turn (when not empty) and the question as the user turn."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        issues.append(RowIssue(row, "system", "bad_type", f"expected a string, got {type(system).__name__}"))
    question = _get_str(record, row, "question", issues)
    prompt: tuple[Message, ...] | None = None
    if question is not None:
        turns = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        prompt = (*turns, {"role": "user", "content": question})
    return _conv_prompt(row, record, issues, prompt, "question")


def _parse_openai(row: int, record: Mapping[str, Any], issues: list[RowIssue]) -> PreferencePair | None:
    """OpenAI preference fine-tuning: input.messages (input.tools), preferred/non_preferred_output."""
    given = record.get("input")
    if not isinstance(given, Mapping):
        got = "missing" if given is None else type(given).__name__
        issues.append(
            RowIssue(
                row,
                "input",
                "bad_type" if given is not None else "missing_field",
                f"expected an object with 'messages'; got {got}",
            )
        )
        given = {}
    prompt = _as_messages(given.get("messages"), row, "input.messages", issues) if given else None
    tools = _tools(given, row, "input.tools", issues, key="tools") if given else None
    if prompt is not None and not prompt:
        issues.append(RowIssue(row, "input.messages", "missing_field", "the prompt has no messages"))
    chosen = _get_response(record, row, "preferred_output", issues)
    rejected = _get_response(record, row, "non_preferred_output", issues)
    if issues or prompt is None or chosen is None or rejected is None:
        return None
    pair = _finish(row, "", chosen, rejected, prompt, issues, tools)
    names = {"chosen": "preferred_output", "rejected": "non_preferred_output"}  # as the file names them
    issues[:] = [RowIssue(i.row, names.get(i.field, i.field), i.code, i.message) for i in issues]
    return pair


def _parse_conv_implicit(
    row: int, record: Mapping[str, Any], issues: list[RowIssue]
) -> PreferencePair | None:
    """Whole conversations; the prompt is their longest shared prefix."""
    chosen = _as_messages(record.get("chosen"), row, "chosen", issues)
    rejected = _as_messages(record.get("rejected"), row, "rejected", issues)
    tools = _tools(record, row, "tools", issues)
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
    return _finish(row, "", contents[0], contents[1], prompt, issues, tools)


PARSERS: dict[str, Parser] = {
    "text": _parse_text,
    "text_implicit": _parse_text_implicit,
    "hh": _parse_hh,
    "conversational": _parse_conversational,
    "conversational_implicit": _parse_conv_implicit,
    "conversational_messages": _parse_conv_messages,
    "orca": _parse_orca,
    "openai": _parse_openai,
}
