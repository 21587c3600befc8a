"""Reading a preference-data source into raw records, one per row, before any row is parsed.

`read_source` reads JSONL (optionally gzipped: one bad line is one bad row), a JSON list (or a
{split: [...]} object), Parquet, a Hugging Face `datasets` folder (`save_to_disk`, or any local
folder `datasets.load_dataset` understands) or a hub id. `datasets` and `pyarrow` are imported
only for the sources that need them.

`ReadLimits` bounds what a source may cost *after* decompression: bytes read, rows, the bytes
of one JSONL line and the nesting depth of a row's JSON. A source past a limit is refused as a
whole (code "too_large", naming the limit) as soon as the limit is passed, with memory bounded
by one line (or by `max_bytes` for a JSON document): a 400 KB gzip that inflates to 400 MB
costs what the limit allows, not 400 MB. A row nested deeper than `max_depth` is a bad row
(code "too_deep"), never a RecursionError.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvkd.pairs import DataError, RowIssue, file_error

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_JSON_SUFFIXES = (".json", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
# Every file type `read_source` reads (the one list: error messages and the service use it).
DATA_SUFFIXES = _JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on reading one source (None = unbounded). The service sets them from its settings
    (TVKD_UPLOAD_MAX_*); the library's default only bounds the nesting depth."""

    max_bytes: int | None = None  # decompressed bytes of a file
    max_rows: int | None = None  # rows (JSONL lines with content, list items, table rows)
    max_line_bytes: int | None = None  # one JSONL line
    max_depth: int = 100  # nesting of a row's JSON (objects and lists)


DEFAULT_LIMITS = ReadLimits()


def too_large(source: str, what: str) -> DataError:
    return file_error(source, "too_large", what)


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, [] or {} is 1), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children)
    return depth


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


def read_source(
    source: str | os.PathLike[str], split: str, limit: int | None, limits: ReadLimits = DEFAULT_LIMITS
) -> RawRows:
    """The rows of a file, folder or hub id (the first `limit` only). Raises DataError when the
    source cannot be read at all or passes one of `limits` (code "too_large"),
    FileNotFoundError for a missing path."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        raw = _read_hf_folder(path, split, limit)
    elif path.is_file():
        name = path.name.lower()
        if name.endswith(_JSONL_SUFFIXES):
            raw = _read_jsonl(path, limit, limits)
        elif name.endswith(_JSON_SUFFIXES):
            raw = _read_json_list(path, split, limit, limits)
        elif name.endswith(_PARQUET_SUFFIXES):
            raw = _read_parquet(path, limit, limits)
        else:
            raise file_error(
                text, "bad_type", f"unsupported file type (use {', '.join(DATA_SUFFIXES)}, or a folder)"
            )
    elif _looks_like_path(text):
        raise FileNotFoundError(f"no such dataset file or folder: {text}")
    else:
        raw = _read_hub(text, split, limit)
    _check_rows(raw, limits)
    return raw


def _check_rows(raw: RawRows, limits: ReadLimits) -> None:
    """Row count and nesting depth of rows read as a whole (list, Parquet, datasets)."""
    if limits.max_rows is not None and raw.total > limits.max_rows:
        raise too_large(raw.name, f"more than {limits.max_rows} rows (the limit of rows)")
    kept = []
    for row, record in raw.records:
        if json_depth(record) > limits.max_depth:
            raw.issues.append(_too_deep(row, limits))
        else:
            kept.append((row, record))
    raw.records = kept


def _too_deep(row: int, limits: ReadLimits) -> RowIssue:
    return RowIssue(
        row, "<row>", "too_deep", f"JSON nested deeper than {limits.max_depth} levels (the limit)"
    )


def _looks_like_path(text: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else that does not exist is a missing path."""
    lowered = text.lower()
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or lowered.endswith(DATA_SUFFIXES)
    )


def _read_jsonl(path: Path, limit: int | None, limits: ReadLimits) -> RawRows:
    """Decode line by line from bytes, so one bad line (bad UTF-8 or JSON) is one bad row and
    the rest of the file still loads. Row = 0-based line number (blank lines are skipped but
    counted, so row + 1 is the line an editor shows). Reads stream (gzip too): memory is one
    line, at most `limits.max_line_bytes`."""
    raw = RawRows(str(path))
    opener = gzip.open if _is_gzip(path) else open
    try:
        _check_inflated_size(path, limits)
        with opener(path, "rb") as fh:
            for lineno, line in _numbered_lines(fh, limit, limits, raw.name):
                _parse_jsonl_line(raw, lineno, line, limits)
    except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip, unreadable file
        raise file_error(str(path), "bad_json", f"cannot read file: {exc}") from exc
    return raw


def _is_gzip(path: Path) -> bool:
    """Whether the file starts with gzip's magic bytes (1f 8b): files are read by their content,
    not their name, so a gzip named `.jsonl` and a plain file named `.jsonl.gz` both load. A file
    that cannot be opened falls back to its name (the read then reports the error)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return path.name.lower().endswith(".gz")


def _check_inflated_size(path: Path, limits: ReadLimits, chunk: int = 1 << 20) -> None:
    """A gzip file is first inflated once without keeping anything (memory: one chunk), so a
    file that inflates past `limits.max_bytes` is refused before a row is parsed or kept."""
    if limits.max_bytes is None or not _is_gzip(path):
        return
    total = 0
    with gzip.open(path, "rb") as fh:
        while block := fh.read(chunk):
            total += len(block)
            if total > limits.max_bytes:
                raise too_large(
                    str(path), f"more than {limits.max_bytes} bytes after decompression (the limit of bytes)"
                )


def _numbered_lines(fh: Any, limit: int | None, limits: ReadLimits, name: str) -> Iterator[tuple[int, bytes]]:
    count, total, lineno = 0, 0, -1
    cap = -1 if limits.max_line_bytes is None else limits.max_line_bytes + 1
    while True:
        line = fh.readline(cap)
        if not line:
            return
        lineno += 1
        total += len(line)
        if limits.max_bytes is not None and total > limits.max_bytes:
            raise too_large(
                name, f"more than {limits.max_bytes} bytes after decompression (the limit of bytes)"
            )
        if limits.max_line_bytes is not None and len(line) > limits.max_line_bytes:
            raise too_large(
                name, f"line {lineno + 1} is longer than {limits.max_line_bytes} bytes (the limit of a line)"
            )
        if lineno == 0:
            line = line.removeprefix(_UTF8_BOM)
        if not line.strip():
            continue
        if limit is not None and count >= limit:
            return
        count += 1
        if limits.max_rows is not None and count > limits.max_rows:
            raise too_large(name, f"more than {limits.max_rows} rows (the limit of rows)")
        yield lineno, line


def _parse_jsonl_line(raw: RawRows, lineno: int, line: bytes, limits: ReadLimits) -> None:
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
    except RecursionError:  # nested deeper than the parser's stack
        raw.issues.append(_too_deep(lineno, limits))
        return
    if json_depth(record) > limits.max_depth:
        raw.issues.append(_too_deep(lineno, limits))
        return
    raw.records.append((lineno, record))
    if isinstance(record, dict):
        raw.columns.update(record)


def _read_json_list(path: Path, split: str, limit: int | None, limits: ReadLimits) -> RawRows:
    """A JSON file is one document, so a decoding error is an error of the whole file. It is
    read whole, but never more than `limits.max_bytes` of it (decompressed)."""
    name = str(path)
    opener = gzip.open if _is_gzip(path) else open
    try:
        _check_inflated_size(path, limits)
        with opener(path, "rb") as fh:
            data = fh.read(-1 if limits.max_bytes is None else limits.max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise file_error(name, "bad_json", f"cannot read file: {exc}") from exc
    if limits.max_bytes is not None and len(data) > limits.max_bytes:
        raise too_large(name, f"more than {limits.max_bytes} bytes after decompression (the limit of bytes)")
    try:
        document = json.loads(data.removeprefix(_UTF8_BOM).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise file_error(name, "not_utf8", f"invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise file_error(name, "bad_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise file_error(
            name, "too_deep", f"JSON nested deeper than the parser allows (limit {limits.max_depth})"
        ) from exc
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


def _read_parquet(path: Path, limit: int | None, limits: ReadLimits) -> RawRows:
    import pyarrow.parquet as pq  # only needed for Parquet sources

    try:
        parquet = pq.ParquetFile(path)
        meta = parquet.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise file_error(str(path), "bad_type", f"cannot read Parquet file: {exc}") from exc
    if limits.max_bytes is not None and size > limits.max_bytes:  # before anything is decoded
        raise too_large(
            str(path), f"{size} bytes uncompressed, more than {limits.max_bytes} (the limit of bytes)"
        )
    if limits.max_rows is not None and meta.num_rows > limits.max_rows:
        raise too_large(str(path), f"{meta.num_rows} rows, more than {limits.max_rows} (the limit of rows)")
    try:
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

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path), split=split)
    except Exception as exc:  # datasets raises many kinds (generation, schema, empty folder)
        cause = exc.__cause__ or exc
        reason = " ".join(str(cause).split())[:300] or "no reason given"
        raise file_error(
            str(path), "bad_type",
            f"cannot be loaded as a datasets folder ({type(cause).__name__}: {reason}); a folder must "
            "be one `save_to_disk` made, or hold data files of one layout; else give one file",
        ) from exc  # fmt: skip
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
