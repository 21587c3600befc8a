"""Tokenization of preference pairs: exact prompt/response token ids and content-offset ends.

`tokenize_pair(s)` renders prompt and response separately and concatenates the ids, so the
prompt ids are a prefix of the sequence by construction and the response tokens (MATH.md's
y_1 .. y_T, end-of-turn/EOS included) are known exactly. Conversational pairs are rendered with
the tokenizer's chat template (the response is what the full rendering adds after the prompt's,
cut after the end-of-turn token). For each response token it also records where the token ends
in *content coordinates* (character offsets into the response content string), which is what
lets teacher values be mapped onto a student with a different tokenizer (MATH.md, "Teacher and
student with different tokenizers").

Needs a fast (Rust) tokenizer for the offset mappings; the tokenizer is the only third-party
object touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tvkd.pairs import (
    DataError,
    DataReport,
    Message,
    OnError,
    PreferencePair,
    RowError,
    RowIssue,
    check_choice,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. `chosen_ids`/`rejected_ids` are the response tokens only (T of
    MATH.md, end-of-turn/EOS included); `*_ends[k]` is the end of token k in content
    coordinates (0 .. len(content)), non-decreasing, the last one equal to len(content)."""

    index: int
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_ends: list[int]
    rejected_ends: list[int]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, *, max_length: int, index: int = 0
) -> TokenizedPair:
    """Tokenize one pair (see the module docstring). Raises RowError for a pair that cannot be
    used (too long, chat template does not round-trip), TypeError for a slow tokenizer."""
    _require_fast(tokenizer)
    _check_max_length(max_length)
    prompt_text = _prompt_text(tokenizer, pair)
    prompt_ids = _encode_prompt(tokenizer, prompt_text)
    if not prompt_ids:
        # Without a single prompt token there is no state s_1 to predict y_1 from.
        raise RowError(RowIssue(pair.row, "prompt", "template", "the prompt has no tokens (and no BOS)"))
    if len(prompt_ids) >= max_length:
        raise RowError(
            RowIssue(
                pair.row,
                "prompt",
                "too_long",
                f"prompt alone is {len(prompt_ids)} tokens; max_length is {max_length}",
            )
        )
    sides: dict[str, tuple[list[int], list[int]]] = {}
    for name, content in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, ends = _encode_response(tokenizer, pair, prompt_text, name, content)
        if len(prompt_ids) + len(ids) > max_length:
            raise RowError(
                RowIssue(
                    pair.row,
                    name,
                    "too_long",
                    f"prompt {len(prompt_ids)} + {name} {len(ids)} tokens > max_length {max_length}",
                )
            )
        sides[name] = (ids, ends)
    return TokenizedPair(
        index=index,
        row=pair.row,
        prompt_ids=prompt_ids,
        chosen_ids=sides["chosen"][0],
        rejected_ids=sides["rejected"][0],
        chosen_ends=sides["chosen"][1],
        rejected_ends=sides["rejected"][1],
    )


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    on_error: OnError = "raise",
) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenize every pair; `TokenizedPair.index` is the pair's position in `pairs`.

    A conversational pair with a tokenizer that has no chat template raises DataError even with
    on_error="drop": that is a setup mistake, and dropping every row would hide it."""
    _require_fast(tokenizer)
    _check_max_length(max_length)
    check_choice("on_error", on_error, ("raise", "drop"))
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    source = f"tokenize({name}, max_length={max_length})"
    check_chat_template(tokenizer, pairs, source)
    out: list[TokenizedPair] = []
    issues: list[RowIssue] = []
    for index, pair in enumerate(pairs):
        try:
            out.append(tokenize_pair(tokenizer, pair, max_length=max_length, index=index))
        except RowError as exc:
            issues.append(exc.issue)
    report = DataReport(source, len(pairs), kept=len(out), dropped=len(issues), issues=issues)
    if issues and on_error == "raise":
        raise DataError(report)
    return out, report


def _require_fast(tokenizer: Any) -> None:
    # Response token ends come from offset mappings, which only fast (Rust) tokenizers give.
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"a fast tokenizer is required (offsets mapping); got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}")


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
        raise DataError(DataReport(source, len(pairs), 0, len(pairs), [_no_template_issue(first.row)]))


def _no_template_issue(row: int) -> RowIssue:
    return RowIssue(
        row,
        "prompt",
        "template",
        "conversational data needs a chat template, and the tokenizer has none",
    )


def _render(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    row: int,
    field_name: str,
) -> str:
    if not has_chat_template(tokenizer):
        raise RowError(_no_template_issue(row))
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # templates raise arbitrary errors (raise_exception, jinja errors)
        raise RowError(RowIssue(row, field_name, "template", f"chat template failed: {exc}")) from exc
    if not isinstance(text, str):
        raise RowError(RowIssue(row, field_name, "template", "chat template did not render text"))
    return text


def _prompt_text(tokenizer: Any, pair: PreferencePair) -> str:
    if pair.prompt_messages is None:
        return pair.prompt
    return _render(
        tokenizer,
        pair.prompt_messages,
        add_generation_prompt=True,
        row=pair.row,
        field_name="prompt",
    )


def _encode_prompt(tokenizer: Any, prompt_text: str) -> list[int]:
    """Add the tokenizer's special tokens only when the text does not already start with BOS
    (chat templates often write it themselves): never a double BOS."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt_text.startswith(bos))
    ids = list(tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"])
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    # Some tokenizers (add_eos_token=True) also append EOS; between prompt and response it would
    # tell the model the sequence is over.
    added_eos = add_special and eos_id is not None and bool(ids) and ids[-1] == eos_id
    if added_eos and not (eos and prompt_text.endswith(eos)):
        ids.pop()
    return ids


def _encode_response(
    tokenizer: Any, pair: PreferencePair, prompt_text: str, name: str, content: str
) -> tuple[list[int], list[int]]:
    if pair.prompt_messages is None:
        response_text, content_start, append_eos = content, 0, True
    else:
        response_text, content_start = _chat_response(tokenizer, pair, prompt_text, name, content)
        append_eos = False  # the template's own end-of-turn token ends the response
    encoding = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    ends = [end - content_start for _, end in encoding["offset_mapping"]]
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        ends.append(len(content))
    if not ids:
        raise RowError(RowIssue(pair.row, name, "empty_response", "response has no tokens"))
    return ids, _content_ends(ends, len(content))


def _content_ends(ends: list[int], length: int) -> list[int]:
    """Clip to [0, length] and make non-decreasing. The last token ends the response, so it is
    `length` whatever the offsets say (tokenizers with trim_offsets move whitespace ends)."""
    out: list[int] = []
    running = 0
    for end in ends:
        running = max(running, min(max(end, 0), length))
        out.append(running)
    out[-1] = length
    return out


def _chat_response(
    tokenizer: Any, pair: PreferencePair, prompt_text: str, name: str, content: str
) -> tuple[str, int]:
    """Render prompt + assistant turn and return (response_text, where the content starts in
    it). The response is what the full rendering adds after the prompt rendering, cut right
    after the first special token (end of turn / EOS) that follows the content."""
    assert pair.prompt_messages is not None
    messages = [*pair.prompt_messages, {"role": "assistant", "content": content}]
    full = _render(tokenizer, messages, add_generation_prompt=False, row=pair.row, field_name=name)
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
    cut = _end_of_turn(tokenizer, rest, stop)
    return (rest if cut is None else rest[:cut]), start


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


def _end_of_turn(tokenizer: Any, rest: str, start: int) -> int | None:
    """Index just after the first special-token string at or after `start` (the earliest; the
    longest on a tie), or None when the template ends the turn without one."""
    best: tuple[int, int] | None = None
    for token in _special_strings(tokenizer):
        pos = rest.find(token, start)
        if pos >= 0 and (best is None or (pos, -len(token)) < (best[0], -best[1])):
            best = (pos, len(token))
    return None if best is None else best[0] + best[1]


def _special_strings(tokenizer: Any) -> set[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token.content))
    return {s for s in specials if s}
