"""Chat templates: rendering a conversational pair's prompt and assistant turn as text.

A conversational pair is rendered the way TRL renders it: the whole messages (roles, content,
`tool_calls`, `name`, `tool_call_id`, ...) and the row's `tools` go to the tokenizer's
`apply_chat_template`. The prompt is the rendering with `add_generation_prompt=True`; a response
is what the rendering of prompt + assistant turn adds after it, cut right after the first special
token that follows the content (the template's end of turn). A row the template cannot render
exactly is a `RowError` (code "template") naming the field: the template fails, the rendered
conversation does not start with the rendered prompt, the content does not appear, or the
template ignores the row's `tools` or an assistant turn's `tool_calls` (which would otherwise
train on an empty assistant turn). Every rendering runs under a time and a memory limit
(`tvkd.sandbox.limited`): a template that loops or grows memory is a bad row with code
"template_time" or "template_memory", and the process stays responsive.

The tokenizer is the only third-party object touched (duck-typed: `apply_chat_template`,
`chat_template`, special tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tvkd.pairs import DataError, DataReport, Message, PreferencePair, RowError, RowIssue
from tvkd.sandbox import TemplateLimit, limited


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render messages (conversational pairs need it)."""
    return getattr(tokenizer, "chat_template", None) is not None


def needs_chat_template(tokenizer: Any, pairs: Sequence[PreferencePair]) -> PreferencePair | None:
    """The first conversational pair when `tokenizer` has no chat template to render it; None
    when the pairs are all text or the tokenizer has a template. The one check of this rule."""
    if has_chat_template(tokenizer):
        return None
    return next((p for p in pairs if p.conversational), None)


def check_chat_template(tokenizer: Any, pairs: Sequence[PreferencePair], source: str) -> None:
    """Raise DataError when conversational pairs meet a tokenizer without a chat template: a setup
    mistake, raised whatever `on_error` says (dropping every row would hide it)."""
    first = needs_chat_template(tokenizer, pairs)
    if first is not None:
        raise DataError(DataReport(source, len(pairs), 0, len(pairs), [no_template_issue(first.row)]))


def no_template_issue(row: int) -> RowIssue:
    return RowIssue(
        row,
        "prompt",
        "template",
        "conversational data needs a chat template, and the tokenizer has none",
    )


def special_strings(tokenizer: Any) -> set[str]:
    """Every special token's text (BOS/EOS/PAD/UNK and added tokens marked special)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token.content))
    return {s for s in specials if s}


def _render(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[Any] | None,
    *,
    add_generation_prompt: bool,
    row: int,
    field_name: str,
) -> str:
    if not has_chat_template(tokenizer):
        raise RowError(no_template_issue(row))
    try:
        text = limited(
            lambda: tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tools=list(tools) if tools else None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        )
    except TemplateLimit as exc:
        raise RowError(RowIssue(row, field_name, f"template_{exc.limit}", str(exc))) from exc
    except Exception as exc:  # templates raise arbitrary errors (raise_exception, jinja errors)
        raise RowError(RowIssue(row, field_name, "template", f"chat template failed: {exc}")) from exc
    if not isinstance(text, str):
        raise RowError(RowIssue(row, field_name, "template", "chat template did not render text"))
    return text


def _renders_differently(tokenizer: Any, text: str, messages: Sequence[Message], tools: Any) -> bool:
    """Whether rendering `messages`/`tools` gives something other than `text` (a template that
    raises on the stripped variant evidently reads what was stripped)."""
    try:
        other = limited(
            lambda: tokenizer.apply_chat_template(
                [dict(m) for m in messages], tools=tools, tokenize=False, add_generation_prompt=True
            )
        )
    except Exception:  # TemplateLimit included: it rendered the full row, so it is not the limit
        return True
    return other != text


def _without_tool_calls(messages: Sequence[Message]) -> list[Message]:
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = m.get("content") or ""
        out.append(m)
    return out


def render_prompt(tokenizer: Any, pair: PreferencePair) -> str:
    """The prompt text of a pair: its text, or its messages (and tools) rendered with the
    generation prompt. RowError (field "prompt", code "template") when the template fails or
    does not render the row's `tools` or the prompt's `tool_calls`."""
    if pair.prompt_messages is None:
        return pair.prompt
    text = _render(
        tokenizer,
        pair.prompt_messages,
        pair.tools,
        add_generation_prompt=True,
        row=pair.row,
        field_name="prompt",
    )
    if pair.tools and not _renders_differently(tokenizer, text, pair.prompt_messages, None):
        raise RowError(
            RowIssue(
                pair.row,
                "tools",
                "template",
                "the chat template does not render the row's `tools` (its output is the same without "
                "them): use a template that renders tools, or drop the column",
            )
        )
    calls = [k for k, m in enumerate(pair.prompt_messages) if m.get("tool_calls")]
    if calls and not _renders_differently(
        tokenizer, text, _without_tool_calls(pair.prompt_messages), pair.tools
    ):
        raise RowError(
            RowIssue(
                pair.row,
                f"prompt[{calls[0]}]",
                "template",
                "the chat template does not render assistant `tool_calls` (the turn would be empty): "
                "use a template that renders tool calls",
            )
        )
    return text


@dataclass(frozen=True)
class AssistantTurn:
    """A rendered response: `text` follows the rendered prompt directly; the content starts at
    `content_start` in it; `ended` says whether a special token (the template's end of turn)
    closes `text`."""

    text: str
    content_start: int
    ended: bool


def render_response(
    tokenizer: Any, pair: PreferencePair, prompt_text: str, name: str, content: str
) -> AssistantTurn:
    """Render prompt + assistant turn and return what it adds after the prompt rendering, cut
    right after the first special token (end of turn / EOS) that follows the content."""
    assert pair.prompt_messages is not None
    messages = [*pair.prompt_messages, {"role": "assistant", "content": content}]
    full = _render(
        tokenizer, messages, pair.tools, add_generation_prompt=False, row=pair.row, field_name=name
    )
    if not full.startswith(prompt_text):
        raise RowError(
            RowIssue(
                pair.row,
                name,
                "template",
                "the rendered conversation does not start with the rendered prompt "
                "(the chat template does not round-trip)",
            )
        )
    rest = full[len(prompt_text) :]
    located = _locate_content(rest, content)
    if located is None:
        raise RowError(
            RowIssue(
                pair.row,
                name,
                "template",
                "the response content does not appear in the rendered assistant turn",
            )
        )
    start, stop = located
    cut = end_of_turn(tokenizer, rest, stop)
    if cut is None:
        return AssistantTurn(rest, start, ended=False)
    return AssistantTurn(rest[:cut], start, ended=True)


def _locate_content(rest: str, content: str) -> tuple[int, int] | None:
    """(start, stop) of the content in `rest`. Templates that trim the content (Llama 3 does)
    are found by the stripped text; start then points where the untrimmed content would begin,
    so content coordinates stay those of the original string."""
    pos = rest.find(content)
    if pos >= 0:
        return pos, pos + len(content)
    stripped = content.strip()
    pos = rest.find(stripped) if stripped else -1
    if pos < 0:
        return None
    lead = len(content) - len(content.lstrip())
    return pos - lead, pos + len(stripped)


def end_of_turn(tokenizer: Any, rest: str, start: int) -> int | None:
    """Index just after the first special-token string at or after `start` (the earliest; the
    longest on a tie), or None when the template ends the turn without one."""
    best: tuple[int, int] | None = None
    for token in special_strings(tokenizer):
        pos = rest.find(token, start)
        if pos >= 0 and (best is None or (pos, -len(token)) < (best[0], -best[1])):
            best = (pos, len(token))
    return None if best is None else best[0] + best[1]
