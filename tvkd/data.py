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

Tokenization (`tokenize_pair(s)`) renders prompt and response separately and concatenates the
ids, so the prompt ids are a prefix of the sequence by construction and the response tokens
(MATH.md's y_1 .. y_T, end-of-turn/EOS included) are known exactly. For each response token it
also records where the token ends in *content coordinates* (character offsets into the response
content string), which is what lets teacher values be mapped onto a student with a different
tokenizer (MATH.md, "Teacher and student with different tokenizers").

This module imports only the standard library at import time: `datasets`, `pyarrow` and the
tokenizer are touched only when used, so the service can validate data without torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OnError = Literal["raise", "drop"]

FORMATS = ("auto", "text", "conversational", "hh")
ISSUE_CODES = (
    "missing_field",
    "bad_type",
    "empty_response",
    "identical",
    "not_utf8",
    "bad_json",
    "too_long",
    "template",
)
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
# How many issues `DataReport.summary` lists before it only counts the rest.
SUMMARY_MAX_ISSUES = 50
# `RowIssue.row` for a problem with the source as a whole (unreadable file, no usable columns).
FILE_ROW = -1

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_JSON_SUFFIXES = (".json", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_UTF8_BOM = b"\xef\xbb\xbf"

Message = dict[str, str]


# --------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair. Text form: `prompt` is the prompt text and `prompt_messages` is None.
    Conversational form: `prompt` is "" and `prompt_messages` holds the prompt turns; `chosen`
    and `rejected` are always the assistant's content strings."""

    row: int
    prompt: str
    chosen: str
    rejected: str
    prompt_messages: tuple[dict[str, str], ...] | None = None

    @property
    def conversational(self) -> bool:
        return self.prompt_messages is not None


@dataclass(frozen=True)
class RowIssue:
    """A bad row: `row` is the 0-based row of the source (FILE_ROW for the whole source),
    `field` the offending field (a path such as "prompt[2]" for one message)."""

    row: int
    field: str
    code: str
    message: str

    def __str__(self) -> str:
        if self.row == FILE_ROW:
            return f"{self.code}: {self.message}"
        return f"row {self.row}, field {self.field!r}: {self.code}: {self.message}"


@dataclass
class DataReport:
    """What loading or tokenizing did: rows seen, pairs kept, bad rows (`dropped`: left out of
    the result, or with on_error="raise" the rows that would have been), and every issue."""

    source: str
    total_rows: int
    kept: int
    dropped: int
    issues: list[RowIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self, max_issues: int = SUMMARY_MAX_ISSUES) -> str:
        lines = [
            f"{self.source}: {self.total_rows} rows, {self.kept} kept, "
            f"{self.dropped} dropped ({len(self.issues)} issues)"
        ]
        lines += [f"  {issue}" for issue in self.issues[:max_issues]]
        if len(self.issues) > max_issues:
            lines.append(f"  ... and {len(self.issues) - max_issues} more issues")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataReport:
        issues = [RowIssue(**issue) for issue in data.get("issues", [])]
        return cls(data["source"], data["total_rows"], data["kept"], data["dropped"], issues)


class DataError(ValueError):
    """The data has bad rows (or cannot be read at all); `report` lists every issue found."""

    def __init__(self, report: DataReport) -> None:
        self.report = report
        super().__init__(_describe_failure(report))

    def __reduce__(self) -> tuple[type[DataError], tuple[DataReport]]:
        # Rebuild from the report (not the message) when pickled, e.g. across worker processes.
        return (type(self), (self.report,))


class RowError(ValueError):
    """One pair cannot be used; `issue` says which row and field, and why."""

    def __init__(self, issue: RowIssue) -> None:
        self.issue = issue
        super().__init__(str(issue))

    def __reduce__(self) -> tuple[type[RowError], tuple[RowIssue]]:
        return (type(self), (self.issue,))


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


def _describe_failure(report: DataReport) -> str:
    if not report.issues:
        return f"{report.source}: no issues"
    first = report.issues[0]
    if first.row == FILE_ROW:
        return f"{report.source}: {first}"
    return (
        f"{report.source}: {report.dropped} bad rows of {report.total_rows} "
        f"({len(report.issues)} issues); first: {first}"
    )


def _file_error(source: str, code: str, message: str) -> DataError:
    issue = RowIssue(FILE_ROW, "<file>", code, message)
    return DataError(DataReport(source, total_rows=0, kept=0, dropped=0, issues=[issue]))


# --------------------------------------------------------------------------------------------
# Reading sources into raw records


@dataclass
class _Raw:
    """Rows as read: (row, record) for rows that parsed, issues for rows that did not."""

    name: str
    records: list[tuple[int, Any]] = field(default_factory=list)
    issues: list[RowIssue] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return len(self.records) + len(self.issues)


def _read_source(source: str | os.PathLike[str], split: str, limit: int | None) -> _Raw:
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_hf_folder(path, split, limit)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(_JSONL_SUFFIXES):
            return _read_jsonl(path, limit)
        if name.endswith(_JSON_SUFFIXES):
            return _read_json_list(path, split, limit)
        if name.endswith(_PARQUET_SUFFIXES):
            return _read_parquet(path, limit)
        raise _file_error(
            text, "bad_type", "unsupported file type (use .jsonl, .jsonl.gz, .json or .parquet)"
        )
    if _looks_like_path(text):
        raise FileNotFoundError(f"no such dataset file or folder: {text}")
    return _read_hub(text, split, limit)


def _looks_like_path(text: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else that does not exist is a missing path."""
    lowered = text.lower()
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or lowered.endswith(_JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES)
    )


def _read_jsonl(path: Path, limit: int | None) -> _Raw:
    """Decode line by line from bytes, so one bad line (bad UTF-8 or JSON) is one bad row and
    the rest of the file still loads. Row = 0-based line number (blank lines are skipped but
    counted, so row + 1 is the line an editor shows)."""
    raw = _Raw(str(path))
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, line in _numbered_lines(fh, limit):
                _parse_jsonl_line(raw, lineno, line)
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip, unreadable file
        raise _file_error(str(path), "bad_json", f"cannot read file: {exc}") from exc
    return raw


def _numbered_lines(fh: Any, limit: int | None) -> Iterator[tuple[int, bytes]]:
    count = 0
    for lineno, line in enumerate(fh):
        if lineno == 0:
            line = line.removeprefix(_UTF8_BOM)
        if not line.strip():
            continue
        if limit is not None and count >= limit:
            return
        count += 1
        yield lineno, line


def _parse_jsonl_line(raw: _Raw, lineno: int, line: bytes) -> None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw.issues.append(
            RowIssue(lineno, "<row>", "not_utf8", f"line {lineno + 1}: invalid UTF-8 at byte {exc.start}")
        )
        return
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raw.issues.append(
            RowIssue(lineno, "<row>", "bad_json", f"line {lineno + 1}: {exc.msg} at column {exc.colno}")
        )
        return
    raw.records.append((lineno, record))
    if isinstance(record, dict):
        raw.columns.update(record)


def _read_json_list(path: Path, split: str, limit: int | None) -> _Raw:
    """A JSON file is one document, so a decoding error is an error of the whole file."""
    name = str(path)
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise _file_error(name, "bad_json", f"cannot read file: {exc}") from exc
    try:
        document = json.loads(data.removeprefix(_UTF8_BOM).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _file_error(name, "not_utf8", f"invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise _file_error(name, "bad_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    # {"train": [...], "test": [...]} is a common way to ship splits in one JSON file.
    if isinstance(document, dict) and isinstance(document.get(split), list):
        document = document[split]
    if not isinstance(document, list):
        raise _file_error(name, "bad_type", "expected a JSON list of objects")
    return _raw_from_rows(name, document[:limit] if limit is not None else document)


def _raw_from_rows(name: str, rows: Sequence[Any], columns: Sequence[str] = ()) -> _Raw:
    raw = _Raw(name, records=list(enumerate(rows)), columns=set(columns))
    for record in rows:
        if isinstance(record, dict):
            raw.columns.update(record)
    return raw


def _read_parquet(path: Path, limit: int | None) -> _Raw:
    import pyarrow.parquet as pq  # only needed for Parquet sources

    try:
        parquet = pq.ParquetFile(path)
        rows: list[dict[str, Any]] = []
        for batch in parquet.iter_batches(batch_size=1024):
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                break
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise _file_error(str(path), "bad_type", f"cannot read Parquet file: {exc}") from exc
    rows = rows[:limit] if limit is not None else rows
    return _raw_from_rows(str(path), rows, parquet.schema_arrow.names)


def _read_hf_folder(path: Path, split: str, limit: int | None) -> _Raw:
    import datasets  # heavy import: only for `datasets` sources

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path), split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise _file_error(str(path), "missing_field", f"no split {split!r}; available: {sorted(loaded)}")
        loaded = loaded[split]
    return _raw_from_dataset(str(path), loaded, limit)


def _read_hub(hub_id: str, split: str, limit: int | None) -> _Raw:
    import datasets  # hub ids only work where the machine is online

    return _raw_from_dataset(hub_id, datasets.load_dataset(hub_id, split=split), limit)


def _raw_from_dataset(name: str, dataset: Any, limit: int | None) -> _Raw:
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return _raw_from_rows(name, list(dataset), dataset.column_names)


# --------------------------------------------------------------------------------------------
# Row forms and validation

# The concrete form a source resolves to ("conversational" splits into TRL's three layouts).
_Form = Literal["text", "conv_prompt", "conv_full", "conv_messages", "hh"]


def _first_value(raw: _Raw, key: str) -> Any:
    for _, record in raw.records:
        if isinstance(record, dict) and record.get(key) is not None:
            return record[key]
    return None


def _resolve_form(format: str, raw: _Raw) -> _Form:
    """One form per source, from its column names (and, where names are not enough, the type of
    the first value): a row that does not fit the source's form is a bad row, not a new form."""
    cols = raw.columns
    if raw.records and cols and not cols & {"chosen", "rejected"}:
        raise _file_error(raw.name, "missing_field", f"no 'chosen'/'rejected' columns (found {sorted(cols)})")
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


def _parse_record(form: _Form, row: int, record: Any) -> tuple[PreferencePair | None, list[RowIssue]]:
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


# --------------------------------------------------------------------------------------------
# load_pairs


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
    _check_choice("format", format, FORMATS)
    _check_choice("on_error", on_error, ("raise", "drop"))
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    raw = _read_source(source, split, limit)
    form = _resolve_form(format, raw)
    pairs: list[PreferencePair] = []
    issues = list(raw.issues)
    for row, record in raw.records:
        pair, row_issues = _parse_record(form, row, record)
        issues.extend(row_issues)
        if pair is not None:
            pairs.append(pair)
    issues.sort(key=lambda issue: issue.row)  # stable: a row's issues keep their field order
    bad_rows = len({issue.row for issue in issues})
    report = DataReport(raw.name, raw.total, kept=len(pairs), dropped=bad_rows, issues=issues)
    if issues and on_error == "raise":
        raise DataError(report)
    return pairs, report


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# --------------------------------------------------------------------------------------------
# Tokenization


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
    _check_choice("on_error", on_error, ("raise", "drop"))
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    source = f"tokenize({name}, max_length={max_length})"
    first_conv = next((p for p in pairs if p.conversational), None)
    if first_conv is not None and not _has_chat_template(tokenizer):
        issue = _no_template_issue(first_conv.row)
        raise DataError(DataReport(source, len(pairs), 0, len(pairs), [issue]))
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


def _has_chat_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


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
    if not _has_chat_template(tokenizer):
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
