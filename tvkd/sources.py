"""Reading a preference-data source into raw records, one per row, before any row is parsed.

`read_source` reads JSONL (optionally gzipped: one bad line is one bad row), a JSON list (or a
{split: [...]} object), Parquet, a Hugging Face `datasets` folder (`save_to_disk`, or any local
folder `datasets.load_dataset` understands) or a hub id. `datasets` and `pyarrow` are imported
only for the sources that need them.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvkd.pairs import RowIssue, file_error

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_JSON_SUFFIXES = (".json", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class RawRows:
    """Rows as read: (row, record) for rows that parsed, issues for rows that did not."""

    name: str
    records: list[tuple[int, Any]] = field(default_factory=list)
    issues: list[RowIssue] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return len(self.records) + len(self.issues)


def read_source(source: str | os.PathLike[str], split: str, limit: int | None) -> RawRows:
    """The rows of a file, folder or hub id (the first `limit` only). Raises DataError when the
    source cannot be read at all, FileNotFoundError for a missing path."""
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
        raise file_error(text, "bad_type", "unsupported file type (use .jsonl, .jsonl.gz, .json or .parquet)")
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


def _read_jsonl(path: Path, limit: int | None) -> RawRows:
    """Decode line by line from bytes, so one bad line (bad UTF-8 or JSON) is one bad row and
    the rest of the file still loads. Row = 0-based line number (blank lines are skipped but
    counted, so row + 1 is the line an editor shows)."""
    raw = RawRows(str(path))
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, line in _numbered_lines(fh, limit):
                _parse_jsonl_line(raw, lineno, line)
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip, unreadable file
        raise file_error(str(path), "bad_json", f"cannot read file: {exc}") from exc
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


def _parse_jsonl_line(raw: RawRows, lineno: int, line: bytes) -> None:
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


def _read_json_list(path: Path, split: str, limit: int | None) -> RawRows:
    """A JSON file is one document, so a decoding error is an error of the whole file."""
    name = str(path)
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise file_error(name, "bad_json", f"cannot read file: {exc}") from exc
    try:
        document = json.loads(data.removeprefix(_UTF8_BOM).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise file_error(name, "not_utf8", f"invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise file_error(name, "bad_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    # {"train": [...], "test": [...]} is a common way to ship splits in one JSON file.
    if isinstance(document, dict) and isinstance(document.get(split), list):
        document = document[split]
    if not isinstance(document, list):
        raise file_error(name, "bad_type", "expected a JSON list of objects")
    return _raw_from_rows(name, document[:limit] if limit is not None else document)


def _raw_from_rows(name: str, rows: Sequence[Any], columns: Sequence[str] = ()) -> RawRows:
    raw = RawRows(name, records=list(enumerate(rows)), columns=set(columns))
    for record in rows:
        if isinstance(record, dict):
            raw.columns.update(record)
    return raw


def _read_parquet(path: Path, limit: int | None) -> RawRows:
    import pyarrow.parquet as pq  # only needed for Parquet sources

    try:
        parquet = pq.ParquetFile(path)
        rows: list[dict[str, Any]] = []
        for batch in parquet.iter_batches(batch_size=1024):
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                break
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise file_error(str(path), "bad_type", f"cannot read Parquet file: {exc}") from exc
    rows = rows[:limit] if limit is not None else rows
    return _raw_from_rows(str(path), rows, parquet.schema_arrow.names)


def _read_hf_folder(path: Path, split: str, limit: int | None) -> RawRows:
    import datasets  # heavy import: only for `datasets` sources

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path), split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise file_error(str(path), "missing_field", f"no split {split!r}; available: {sorted(loaded)}")
        loaded = loaded[split]
    return _raw_from_dataset(str(path), loaded, limit)


def _read_hub(hub_id: str, split: str, limit: int | None) -> RawRows:
    import datasets  # hub ids only work where the machine is online

    return _raw_from_dataset(hub_id, datasets.load_dataset(hub_id, split=split), limit)


def _raw_from_dataset(name: str, dataset: Any, limit: int | None) -> RawRows:
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return _raw_from_rows(name, list(dataset), dataset.column_names)
