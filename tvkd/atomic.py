"""Atomic JSON files: a reader sees the old file or the new one, never half of one.

`write_json_atomic` writes to a temporary file beside the target (a unique name ending in
`.tmp`, so two writers never share one, and folders that sweep `*.tmp` leftovers of killed
writes, like the value store, remove it) and renames it over the target with `os.replace`.
Standard library only: the API and the workers import it cheaply.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def strict_json(value: Any) -> Any:
    """`value` with what JSON cannot hold replaced: non-finite floats become None (JSON has no
    NaN or infinity), tuples and sets lists, dict keys strings, any other object its str()."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def write_json_atomic(
    path: str | os.PathLike[str],
    data: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
    fsync: bool = False,
) -> Path:
    """Write `data` as JSON (UTF-8, non-ASCII kept) to `path` atomically; returns the path.

    `fsync` flushes the file to disk before the rename (for files whose loss after a power cut
    would cost more than a rewrite). The temporary file is removed if anything fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:  # "x": never another writer's file
            json.dump(data, fh, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=False)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path
