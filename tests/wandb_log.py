"""Read an offline W&B run's transaction log (`run-<id>.wandb`) back in tests.

wandb ≥ 0.23 no longer ships a Python reader of its log (its Go core writes and syncs it), so the
tests read it here: the file is LevelDB's log format (32 KiB blocks of 7-byte-headed fragments)
after a 7-byte W&B header, and each record is wandb's own protobuf `Record`, decoded by wandb's
generated classes. Only the framing is written here, checked against the CRC-free layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
FRAGMENT = struct.Struct("<IHB")  # crc32c, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: str | Path) -> list[Any]:
    """Every `wandb_internal_pb2.Record` of the log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"not a W&B log: {path}"
    out, pos, pending = [], HEADER.size, b""
    while pos + FRAGMENT.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < FRAGMENT.size:  # the block's tail is padding
            pos += room
            continue
        _crc, length, kind = FRAGMENT.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding at the end
            break
        body = data[pos + FRAGMENT.size : pos + FRAGMENT.size + length]
        pos += FRAGMENT.size + length
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _item_value(item: Any) -> Any:
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which and which != "value_json":
        return getattr(item, which)
    return json.loads(item.value_json)


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged history rows ({"_step": …, key: value, …}) in order."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): _item_value(item) for item in record.history.item}
            )
    return rows


def config(path: str | Path) -> dict[str, Any]:
    """The run's config (the run record's, then every update in order)."""
    out: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = (
            record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        )
        for item in updates:
            out[item.key] = json.loads(item.value_json)
    return out


def summary(path: str | Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
