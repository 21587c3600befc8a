"""Preference pairs and what can be wrong with them: the types every data module shares.

`PreferencePair` is one (prompt, chosen, rejected) pair as loaded (`tvkd.data.load_pairs`);
`RowIssue` is one problem with one row (row, field, code, message; the codes are listed in
`tvkd.data`); `DataReport` counts rows seen, kept and dropped with every issue; `DataError` (the
data has bad rows) and `RowError` (one pair cannot be used) carry them. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

OnError = Literal["raise", "drop"]

ISSUE_CODES = (
    "missing_field",
    "bad_type",
    "empty_response",
    "identical",
    "not_utf8",
    "bad_json",
    "too_long",
    "template",
    "boundary",
    "special_token",
    "round_trip",
)
# How many issues `DataReport.summary` lists before it only counts the rest.
SUMMARY_MAX_ISSUES = 50
# `RowIssue.row` for a problem with the source as a whole (unreadable file, no usable columns).
FILE_ROW = -1

# A chat message as TRL/OpenAI write it: "role", "content" (a string, or null on an assistant turn
# with "tool_calls"), and any of "tool_calls", "name", "tool_call_id", ... passed to the template.
Message = dict[str, Any]


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair. Text form: `prompt` is the prompt text and `prompt_messages` is None.
    Conversational form: `prompt` is "" and `prompt_messages` holds the prompt turns (whole
    messages: tool calls included); `tools` the row's tool definitions for the chat template, if
    any. `chosen` and `rejected` are always the assistant's content strings."""

    row: int
    prompt: str
    chosen: str
    rejected: str
    prompt_messages: tuple[Message, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None

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
    the result, or with on_error="raise" the rows that would have been), and every issue.
    Loading also says which layout the rows were read as, and why (`layout`, `layout_reason`)."""

    source: str
    total_rows: int
    kept: int
    dropped: int
    issues: list[RowIssue] = field(default_factory=list)
    layout: str | None = None
    layout_reason: str | None = None

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self, max_issues: int = SUMMARY_MAX_ISSUES) -> str:
        lines = [
            f"{self.source}: {self.total_rows} rows, {self.kept} kept, "
            f"{self.dropped} dropped ({len(self.issues)} issues)"
        ]
        if self.layout:
            lines.append(f"  layout: {self.layout} ({self.layout_reason})")
        lines += [f"  {issue}" for issue in self.issues[:max_issues]]
        if len(self.issues) > max_issues:
            lines.append(f"  ... and {len(self.issues) - max_issues} more issues")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataReport:
        issues = [RowIssue(**issue) for issue in data.get("issues", [])]
        return cls(
            data["source"],
            data["total_rows"],
            data["kept"],
            data["dropped"],
            issues,
            data.get("layout"),
            data.get("layout_reason"),
        )


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


def file_error(source: str, code: str, message: str) -> DataError:
    """A DataError for a problem with the whole source (an unreadable file, no usable columns)."""
    issue = RowIssue(FILE_ROW, "<file>", code, message)
    return DataError(DataReport(source, total_rows=0, kept=0, dropped=0, issues=[issue]))


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """ValueError naming the argument unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
