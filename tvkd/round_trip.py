"""The round trip of a tokenized text: decoding its ids must give the text back (property 3 of
tvkd/tokenize.py; code "round_trip" otherwise: characters the vocabulary lacks, normalizers that
change the text). Decoders that strip a dummy-prefix space are compared run by run between
special tokens too (`decodes_to`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tvkd.pairs import RowError, RowIssue

_CONTEXT = 12  # characters shown on each side of a round-trip difference


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decode_by_segment(tokenizer: Any, ids: Sequence[int]) -> str:
    """Special tokens as their text, the runs between them decoded one by one. Decoders that
    strip the dummy-prefix space at the start of a text (Llama-2 `Strip`, Metaspace) then strip
    it at the start of each run, where normalizers such as Llama-2's `Prepend("▁")` added it."""
    specials = set(tokenizer.all_special_ids) | {
        i
        for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if getattr(t, "special", False)
    }
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if i in specials:
            if run:
                parts.append(_decode(tokenizer, run))
                run = []
            parts.append(tokenizer.convert_ids_to_tokens(i))
        else:
            run.append(i)
    if run:
        parts.append(_decode(tokenizer, run))
    return "".join(parts)


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def decodes_to(tokenizer: Any, ids: Sequence[int], text: str) -> str | None:
    """None when `ids` decode to `text` — whole, or run by run between special tokens (see
    `_decode_by_segment`) — else the decoding closer to it, for the message."""
    whole = _decode(tokenizer, ids)
    if whole == text:
        return None
    runs = _decode_by_segment(tokenizer, ids)
    if runs == text:
        return None
    return max((whole, runs), key=lambda d: _common_prefix(d, text))


def check_round_trip(tokenizer: Any, ids: Sequence[int], text: str, row: int, name: str, start: int) -> None:
    """Raise a "round_trip" RowError for `row`'s side `name` unless `ids` decode to `text`
    (`start`: where the response begins in `text`, to say which part differs)."""
    decoded = decodes_to(tokenizer, ids, text)
    if decoded is None:
        return
    k = _common_prefix(decoded, text)
    lo = max(k - _CONTEXT, 0)
    where = "in the prompt" if k < start else "in the response"
    raise RowError(
        RowIssue(
            row,
            name,
            "round_trip",
            f"the tokens do not decode to the text ({where}, character {k}): the text has "
            f"{text[lo : k + _CONTEXT]!r}, the tokens give {decoded[lo : k + _CONTEXT]!r} "
            "(characters the vocabulary lacks, or a normalizer that changes the text)",
        )
    )
