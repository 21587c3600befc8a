"""Streaming multipart upload of one file, straight to disk with a size limit.

Starlette's `request.form()` spools a whole upload to a temporary file before the route runs, so
a size limit there would come after the disk was filled. Here the body is parsed as it arrives
(python-multipart's streaming parser) and written under the artifact root; a declared
Content-Length over the limit is refused before any byte is read, and a chunked body is cut off
at the first byte past it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from service.errors import APIError

# Room for the multipart framing around the file (boundaries, part headers, small fields).
FRAMING_BYTES = 64 * 1024
SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "data.jsonl") -> str:
    """A file name that is safe on any file system: the last path component, plain characters."""
    base = re.split(r"[\\/]", name)[-1]
    base = SAFE_NAME_RE.sub("_", base).lstrip(".")[:120]
    return base or default


def too_large(limit: int) -> APIError:
    return APIError(
        413, "upload_too_large", f"the upload is larger than the limit of {limit} bytes", field="file"
    )


@dataclass
class ReceivedFile:
    filename: str  # safe_filename of the client's name
    path: Path
    bytes: int = 0
    sha256: str = ""


@dataclass
class _State:
    dest: Path
    field_name: str
    limit: int
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[str, bytes] = field(default_factory=dict)
    out: IO[bytes] | None = None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: ReceivedFile | None = None
    size: int = 0
    error: APIError | None = None


def _callbacks(state: _State) -> dict[str, object]:
    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[state.header_field.decode("latin-1").lower()] = bytes(state.header_value)
        state.header_field.clear()
        state.header_value.clear()

    def on_headers_finished() -> None:
        _, params = parse_options_header(state.headers.get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if name != state.field_name or filename is None:
            return  # another form field: ignored
        if state.received is not None:
            state.error = APIError(422, "invalid_upload", "send exactly one file", field="file")
            return
        safe = safe_filename(filename.decode("utf-8", "replace"))
        state.received = ReceivedFile(safe, state.dest / safe)
        state.out = open(state.received.path, "wb")  # noqa: SIM115 - closed on part end or error

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.out is None:
            return
        chunk = data[start:end]
        state.size += len(chunk)
        if state.size > state.limit:
            state.error = too_large(state.limit)
            return
        state.digest.update(chunk)
        state.out.write(chunk)

    def on_part_end() -> None:
        if state.out is not None:
            state.out.close()
            state.out = None
        state.headers = {}

    return {
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }


async def receive_file(
    request: Request, dest: Path, *, limit: int, field_name: str = "file", idle_seconds: float = 30.0
) -> ReceivedFile:
    """Parse the multipart body, writing the `field_name` file part into `dest` (a fresh folder).
    413 past `limit` bytes of file; 408 when the body sends nothing for `idle_seconds` (a stalled
    client must not hold a worker thread and a half-written file); 422 for a body that is not
    multipart or holds no such file."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(
            422, "invalid_upload", f"send the file as multipart/form-data, field {field_name!r}", field="file"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FRAMING_BYTES:
        raise too_large(limit)
    state = _State(dest=dest, field_name=field_name, limit=limit)
    parser = MultipartParser(boundary, _callbacks(state))  # type: ignore[arg-type]
    try:
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), timeout=idle_seconds)
            except StopAsyncIteration:
                break
            except TimeoutError as exc:
                raise APIError(
                    408,
                    "upload_timeout",
                    f"the upload sent nothing for {idle_seconds:g} s (TVKD_UPLOAD_IDLE_SECONDS); "
                    "send it again",
                    field="file",
                ) from exc
            parser.write(chunk)
            if state.error is not None:
                raise state.error
        parser.finalize()
    except MultipartParseError as exc:
        raise APIError(422, "invalid_upload", f"malformed multipart body: {exc}", field="file") from exc
    finally:
        if state.out is not None:
            state.out.close()
    if state.received is None:
        raise APIError(422, "missing_file", f"no file in form field {field_name!r}", field="file")
    state.received.bytes = state.size
    state.received.sha256 = state.digest.hexdigest()
    return state.received


def prune_incoming(artifacts: Path, older_than: float = 3600.0) -> int:
    """Remove upload folders left behind by a process that died mid-upload; returns how many."""
    root = artifacts / "datasets" / ".incoming"
    removed = 0
    if root.is_dir():
        cutoff = time.time() - older_than
        for folder in root.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            except OSError:
                continue  # removed by another process meanwhile
    return removed


def incoming_dir(artifacts: Path) -> Path:
    """A fresh private folder for one upload, under the artifact root (so that accepting it is an
    atomic rename on the same file system)."""
    path = artifacts / "datasets" / ".incoming" / secrets.token_hex(8)
    path.mkdir(parents=True)
    return path
