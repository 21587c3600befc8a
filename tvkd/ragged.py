"""Ragged per-sequence arrays in one memory-mappable safetensors file.

Each named field is a flat array holding the rows back to back, plus `<field>.offsets` (int32,
or int64 past 2³¹ elements; n+1 entries): row i is `flat[offsets[i]:offsets[i+1]]`. Rows may
carry trailing dimensions (top-k ids: [T+1, k]). Reading maps the file with numpy (the
safetensors header gives each tensor's byte range), so opening a store of any size costs its
header, and a row is a view. Writes go to a temporary name and are renamed into place, so a file
that exists is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

OFFSETS = ".offsets"


def write_ragged(
    path: str | os.PathLike,
    fields: Mapping[str, Sequence[np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `fields` (name → list of per-row arrays) atomically; returns the file's size in bytes."""
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    n_rows = None
    for name, rows in fields.items():
        if n_rows is None:
            n_rows = len(rows)
        elif len(rows) != n_rows:
            raise ValueError(f"field {name!r} has {len(rows)} rows, expected {n_rows}")
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        # int32 offsets where they fit (always, for shards of a few hundred pairs): for short
        # responses the offsets are a visible share of the store's bytes per token.
        total = int(lengths.sum())
        offsets = np.zeros(len(rows) + 1, dtype=np.int32 if total < 2**31 else np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tensors[name] = np.ascontiguousarray(np.concatenate(rows)) if rows else np.zeros(0, np.float32)
        tensors[name + OFFSETS] = offsets
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"rows": str(n_rows or 0), **(metadata or {})})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


_DTYPES = {
    "F32": np.float32,
    "F64": np.float64,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "U16": np.uint16,
    "U8": np.uint8,
    "I8": np.int8,
}


class RaggedFile:
    """Read access to a file written by `write_ragged`, memory-mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        base = 8 + header_len
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._arrays: dict[str, np.ndarray] = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            self._arrays[name] = mm[base + start : base + end].view(dtype).reshape(info["shape"])
        self.fields = sorted(k for k in self._arrays if not k.endswith(OFFSETS))
        self._offsets = {k: np.asarray(self._arrays[k + OFFSETS]) for k in self.fields}
        self.rows = int(self.metadata.get("rows", 0))

    def __len__(self) -> int:
        return self.rows

    def flat(self, field: str) -> np.ndarray:
        return self._arrays[field]

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the file by name (each field's flat array and its `.offsets`), mapped."""
        return dict(self._arrays)

    def row(self, field: str, i: int) -> np.ndarray:
        if field not in self._offsets:
            raise KeyError(f"{self.path.name} has no field {field!r} (has {self.fields})")
        off = self._offsets[field]
        if not 0 <= i < len(off) - 1:
            raise IndexError(f"row {i} out of range 0..{len(off) - 2}")
        return self.flat(field)[off[i] : off[i + 1]]

    def meta_json(self, key: str) -> object:
        return json.loads(self.metadata[key])
