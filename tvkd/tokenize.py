"""Tokenization of preference pairs: exact prompt/response token ids and content-offset ends.

A pair's rendered prompt (its text, or its messages through the chat template, `tvkd.templates`)
and each rendered response are tokenized *jointly*, as TRL does: the response ids are the ids
that the tokenization of prompt + response has after the prompt's own ids. So every tokenizer
family gets the ids it gives the whole text — byte-level BPE (GPT-2, Llama-3, Qwen), SentencePiece
Metaspace (`prepend_scheme` "first"/"always"), Llama-2 "legacy" normalizers, byte fallback —
never a response encoded alone with a spurious dummy-prefix "▁". Three properties hold for every
kept pair, and a pair where one cannot hold is a named bad row (`RowError`), never a silent change:

1. exact: `prompt_ids + response_ids` is the tokenization of the rendered text (BOS etc. added
   by the tokenizer's post-processor in front, when the text does not start with BOS itself);
   when tokens merge across the prompt/response boundary, the prompt's ids are not a prefix of
   the joint ids and the row is bad (code "boundary");
2. one end: each response ends with exactly one end-of-response token: the chat template's end
   of turn, or for text (and templates that end a turn without a special token) EOS, appended
   unless the response already ends with a special token (trailing whitespace after it is cut);
   an end-of-response token inside a response is a bad row (code "special_token");
3. round trip: decoding `prompt_ids + response_ids` gives back the rendered text (code
   "round_trip" otherwise: unknown characters, normalizers that change the text).

For each response token it also records where the token ends in *content coordinates*
(character offsets into the response content string), which is what lets teacher values be
mapped onto a student with a different tokenizer (MATH.md, "Teacher and student with different
tokenizers"). Rows longer than `max_length` are bad rows (code "too_long") or, with a
`truncation_mode` of TRL's names, cut: "keep_start" keeps the prompt and the start of each
response (a cut response loses its end token), "keep_end" keeps both responses whole and the end
of the prompt (its BOS stays).

Needs a fast (Rust) tokenizer for the offset mappings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tvkd.config import TRUNCATIONS
from tvkd.pairs import (
    DataError,
    DataReport,
    OnError,
    PreferencePair,
    RowError,
    RowIssue,
    check_choice,
)
from tvkd.round_trip import check_round_trip, decodes_to
from tvkd.templates import (
    check_chat_template,
    has_chat_template,
    needs_chat_template,
    render_prompt,
    render_response,
    special_strings,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TRUNCATION_MODES",
    "TokenizedPair",
    "check_chat_template",
    "decodes_to",
    "end_token_ids",
    "has_chat_template",
    "needs_chat_template",
    "tokenize_pair",
    "tokenize_pairs",
]

TRUNCATION_MODES = TRUNCATIONS
TEMPLATE_LIMIT_CODES = ("template_time", "template_memory")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. `chosen_ids`/`rejected_ids` are the response tokens only (T of
    MATH.md, the end-of-response token included); `*_ends[k]` is the end of token k in content
    coordinates (0 .. len(content)), non-decreasing, the last one equal to len(content) unless
    the response was truncated. `truncated` says whether `truncation_mode` cut the pair."""

    index: int
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_ends: list[int]
    rejected_ends: list[int]
    truncated: bool = False


@dataclass
class _Side:
    ids: list[int]
    ends: list[int]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: PreferencePair,
    *,
    max_length: int,
    index: int = 0,
    truncation_mode: str = "none",
) -> TokenizedPair:
    """Tokenize one pair (see the module docstring). Raises RowError for a pair that cannot be
    used (codes "too_long", "template", "boundary", "special_token", "round_trip",
    "empty_response"), TypeError for a slow tokenizer, ValueError for a bad argument."""
    _require_fast(tokenizer)
    _check_max_length(max_length)
    check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    prompt_text = render_prompt(tokenizer, pair)
    bos = tokenizer.bos_token
    lead = [] if bos and prompt_text.startswith(bos) else _lead_ids(tokenizer)
    prompt_plain = _encode(tokenizer, prompt_text)
    prompt_ids = lead + prompt_plain
    if not prompt_ids:
        # Without a single prompt token there is no state s_1 to predict y_1 from.
        raise RowError(RowIssue(pair.row, "prompt", "template", "the prompt has no tokens (and no BOS)"))
    lead_text = "".join(tokenizer.convert_ids_to_tokens(lead))
    check_round_trip(tokenizer, prompt_ids, lead_text + prompt_text, pair.row, "prompt", 0)
    sides = {
        name: _tokenize_response(tokenizer, pair, prompt_text, prompt_plain, lead, lead_text, name, content)
        for name, content in (("chosen", pair.chosen), ("rejected", pair.rejected))
    }
    prompt_ids, truncated = _fit(tokenizer, pair.row, prompt_ids, sides, max_length, truncation_mode)
    return TokenizedPair(
        index=index,
        row=pair.row,
        prompt_ids=prompt_ids,
        chosen_ids=sides["chosen"].ids,
        rejected_ids=sides["rejected"].ids,
        chosen_ends=sides["chosen"].ends,
        rejected_ends=sides["rejected"].ends,
        truncated=truncated,
    )


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    on_error: OnError = "raise",
    truncation_mode: str = "none",
) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenize every pair; `TokenizedPair.index` is the pair's position in `pairs`.

    A conversational pair with a tokenizer that has no chat template raises DataError even with
    on_error="drop": that is a setup mistake, and dropping every row would hide it. So does a
    chat template that runs past its time or memory limit (codes "template_time",
    "template_memory", `tvkd.sandbox`), at the first row it does so: every row would wait for it."""
    _require_fast(tokenizer)
    _check_max_length(max_length)
    check_choice("on_error", on_error, ("raise", "drop"))
    check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    source = f"tokenize({name}, max_length={max_length})"
    check_chat_template(tokenizer, pairs, source)
    out: list[TokenizedPair] = []
    issues: list[RowIssue] = []
    for index, pair in enumerate(pairs):
        try:
            out.append(
                tokenize_pair(
                    tokenizer, pair, max_length=max_length, index=index, truncation_mode=truncation_mode
                )
            )
        except RowError as exc:
            issues.append(exc.issue)
            if exc.issue.code in TEMPLATE_LIMIT_CODES:  # the template, not the row: stop at once
                raise DataError(
                    DataReport(source, len(pairs), kept=0, dropped=1, issues=[exc.issue])
                ) from exc
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


# --------------------------------------------------------------------------------------------
# Encoding


# verbose=False in every encode: tvkd tokenizes rows longer than the model on purpose and measures
# them itself (too_long, tvkd.windows); transformers' "Token indices sequence length is longer
# than the specified maximum sequence length" warning would only be noise in `tvkd data check`.


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _lead_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer's post-processor puts in front of a text (BOS, or none),
    found by encoding a probe with and without special tokens (two tiny encodes; not cached, since
    settings such as `add_bos_token` change the post-processor). Trailing ones (an EOS some
    tokenizers append) are not taken: between prompt and response they would end the text."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def end_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens that end a response (EOS, end-of-turn tokens): a response whose last id
    is not one of them was cut (truncation_mode="keep_start")."""
    ids = {tokenizer.convert_tokens_to_ids(s) for s in _end_tokens(tokenizer)} | {tokenizer.eos_token_id}
    return {i for i in ids if isinstance(i, int)}


def _end_tokens(tokenizer: Any) -> set[str]:
    """Special tokens a text response may already end with (EOS, end-of-turn tokens)."""
    skip = {tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token} - {tokenizer.eos_token}
    return {s for s in special_strings(tokenizer) if s not in skip}


def _ends_with_special(tokenizer: Any, text: str) -> int | None:
    """Length of `text` up to and including the special token it ends with (trailing whitespace
    after it aside), or None."""
    stripped = text.rstrip()
    for token in sorted(_end_tokens(tokenizer), key=len, reverse=True):
        if stripped.endswith(token):
            return len(stripped)
    return None


def _tokenize_response(
    tokenizer: Any,
    pair: PreferencePair,
    prompt_text: str,
    prompt_plain: list[int],
    lead: list[int],
    lead_text: str,
    name: str,
    content: str,
) -> _Side:
    """The response tokens of one side: the joint tokenization of prompt + rendered response,
    after the prompt's ids; EOS appended when nothing ends the response; checked (module doc)."""
    if pair.prompt_messages is None:
        response_text, content_start = content, 0
        cut = _ends_with_special(tokenizer, content)
        ended = cut is not None
        if cut is not None:
            response_text = content[:cut]
    else:
        turn = render_response(tokenizer, pair, prompt_text, name, content)
        response_text, content_start, ended = turn.text, turn.content_start, turn.ended
    encoding = tokenizer(
        prompt_text + response_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )
    joint = list(encoding["input_ids"])
    p = len(prompt_plain)
    if joint[:p] != prompt_plain:
        raise RowError(_boundary_issue(tokenizer, pair.row, name, prompt_plain, joint))
    ids = joint[p:]
    shift = len(prompt_text) + content_start
    ends = [end - shift for _, end in encoding["offset_mapping"][p:]]
    eos_id = tokenizer.eos_token_id
    appended = ""
    if not ended and eos_id is not None:
        ids.append(eos_id)
        ends.append(len(content))
        appended = tokenizer.eos_token
    if not ids:
        raise RowError(RowIssue(pair.row, name, "empty_response", "response has no tokens"))
    _check_one_end(tokenizer, pair.row, name, ids)
    expected = lead_text + prompt_text + response_text + appended
    check_round_trip(
        tokenizer, lead + prompt_plain + ids, expected, pair.row, name, len(lead_text) + len(prompt_text)
    )
    return _Side(ids, _content_ends(ends, len(content)))


def _boundary_issue(tokenizer: Any, row: int, name: str, prompt: list[int], joint: list[int]) -> RowIssue:
    k = next(
        (i for i, (a, b) in enumerate(zip(prompt, joint, strict=False)) if a != b),
        min(len(prompt), len(joint)),
    )
    alone = tokenizer.convert_ids_to_tokens(prompt[k:])
    together = tokenizer.convert_ids_to_tokens(joint[k : k + len(prompt) - k + 1])
    return RowIssue(
        row,
        name,
        "boundary",
        f"tokens merge across the prompt/response boundary: the prompt ends {alone!r} alone but "
        f"{together!r} with the response, so no token boundary separates them; end the prompt "
        "where the tokenizer splits (e.g. move trailing whitespace from the prompt to the responses)",
    )


def _check_one_end(tokenizer: Any, row: int, name: str, ids: list[int]) -> None:
    """Exactly one end-of-response token, the last one: neither it nor EOS earlier on."""
    ends = {ids[-1], tokenizer.eos_token_id} - {None}
    early = next((k for k, t in enumerate(ids[:-1]) if t in ends), None)
    if early is not None:
        token = tokenizer.convert_ids_to_tokens(ids[early])
        raise RowError(
            RowIssue(
                row,
                name,
                "special_token",
                f"the response holds the end-of-response token {token!r} before its end (token "
                f"{early} of {len(ids)}): a response must end exactly once",
            )
        )


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


# --------------------------------------------------------------------------------------------
# Length


def _fit(
    tokenizer: Any, row: int, prompt: list[int], sides: dict[str, _Side], max_length: int, mode: str
) -> tuple[list[int], bool]:
    """Apply max_length: a too_long RowError (mode "none"), or cut (module docstring)."""
    longest = max(len(s.ids) for s in sides.values())
    if len(prompt) + longest <= max_length:
        return prompt, False
    if mode == "keep_end":
        keep = 1 if prompt[0] == tokenizer.bos_token_id else 0  # BOS stays in front
        room = max_length - longest - keep
        if room < 1 or len(prompt) - keep < 1:
            name = max(sides, key=lambda s: len(sides[s].ids))
            raise RowError(
                RowIssue(
                    row,
                    name,
                    "too_long",
                    f"{name} alone is {longest} tokens; with truncation_mode='keep_end' it must leave "
                    f"at least one prompt token within max_length {max_length}",
                )
            )
        return prompt[:keep] + prompt[len(prompt) - room :], True
    if len(prompt) >= max_length:
        raise RowError(
            RowIssue(
                row, "prompt", "too_long", f"prompt alone is {len(prompt)} tokens; max_length is {max_length}"
            )
        )
    if mode == "keep_start":
        room = max_length - len(prompt)
        for side in sides.values():
            side.ids, side.ends = side.ids[:room], side.ends[:room]
        return prompt, True
    for name, side in sides.items():
        if len(prompt) + len(side.ids) > max_length:
            raise RowError(
                RowIssue(
                    row,
                    name,
                    "too_long",
                    f"prompt {len(prompt)} + {name} {len(side.ids)} tokens > max_length {max_length}",
                )
            )
    raise AssertionError("unreachable")
