"""The teacher value store: content-addressed, memory-mapped, written shard by shard, resumable.

DESIGN.md "Storage": per pair and side, V at each of the T+1 states as flat float32 arrays with
offsets in safetensors files (`tvkd.ragged`), plus a manifest holding the content key. Layout:

    <root>/<key>/shard-00000.safetensors   pairs [0, shard_size)
    <root>/<key>/shard-00001.safetensors   pairs [shard_size, 2·shard_size)  ...
    <root>/<key>/manifest.json             written last: its presence (complete=true) is the commit
    <root>/<key>/.lock, .lock-00000 ...    fcntl locks of the key and of each shard (`tvkd.store_lock`)

The key is a hash of everything that changes the stored numbers (teacher weights, tokenizer and
chat template, dataset, max length, q_source, β_v, top-k, token stats, precision), so the same
request finds the same folder and is never recomputed (`tvkd.store_key`). Every file appears by
an atomic rename, so a file that exists is whole: a killed precompute leaves finished shards that
a rerun keeps.
Several processes may fill one key, each writing the shards it holds the lock of; the manifest is
written once, by whoever finds every shard done.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tvkd.atomic import write_json_atomic
from tvkd.numerics import first_nonfinite
from tvkd.ragged import RaggedFile, write_ragged
from tvkd.store_key import STORE_FORMAT
from tvkd.store_key import content_key as content_key  # re-exported: the key is the store's
from tvkd.store_key import key_fields as key_fields
from tvkd.store_lock import KEY_LOCK, hold, shard_lock_name
from tvkd.store_lock import StoreError as StoreError  # re-exported: the store's errors
from tvkd.store_lock import StoreLockTimeout as StoreLockTimeout

MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")


@dataclass
class PairValues:
    """The teacher's signals for one pair, in the teacher's tokenization.

    `*_values` has T+1 entries (V at s_1 .. s_{T+1}); token stats have T (one per response token);
    top-k arrays have T+1 rows of k. Optional arrays are None when the store was built without them.
    """

    chosen_values: np.ndarray
    rejected_values: np.ndarray
    chosen_token_logps: np.ndarray | None = None
    rejected_token_logps: np.ndarray | None = None
    chosen_token_logits: np.ndarray | None = None
    rejected_token_logits: np.ndarray | None = None
    chosen_topk_logits: np.ndarray | None = None
    rejected_topk_logits: np.ndarray | None = None
    chosen_topk_ids: np.ndarray | None = None
    rejected_topk_ids: np.ndarray | None = None

    def response_tokens(self) -> int:
        """T_chosen + T_rejected (teacher tokens)."""
        return len(self.chosen_values) + len(self.rejected_values) - 2


PAIR_FIELDS = tuple(f.name for f in fields(PairValues))


def store_arrays(topk: int, token_stats: bool) -> list[str]:
    """Names of the ragged fields a store with these options holds (sorted for a stable order)."""
    names = [f"{s}_values" for s in SIDES]
    if token_stats:
        names += [f"{s}_token_{x}" for s in SIDES for x in ("logps", "logits")]
    if topk:
        names += [f"{s}_topk_{x}" for s in SIDES for x in ("logits", "ids")]
    return sorted(names)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _empty_row(name: str, k: int) -> np.ndarray:
    """The zero-length row that stands for a missing pair in field `name`."""
    if name.endswith("_topk_ids"):
        return np.zeros((0, k), np.int32)
    if name.endswith("_topk_logits"):
        return np.zeros((0, k), np.float32)
    return np.zeros(0, np.float32)


def _coerce(name: str, arr: np.ndarray) -> np.ndarray:
    dtype = np.int32 if name.endswith("_ids") else np.float32
    return np.ascontiguousarray(arr, dtype=dtype)


class ValueStore:
    """Read access to a complete store folder. Shards are memory-mapped when first touched."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.key: str = manifest["key"]
        self.num_pairs: int = int(manifest["num_pairs"])
        self.shard_size: int = int(manifest["shard_size"])
        self.arrays: list[str] = list(manifest["arrays"])
        self.missing: set[int] = {int(i) for i in manifest["missing"]}
        self._shards: dict[int, RaggedFile] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> ValueStore:
        """Open a complete store folder; StoreError when it is absent or not finished."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{path} is not a complete value store (no {MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise StoreError(f"{path} is not complete")
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{path} has store format {manifest.get('format')}, expected {STORE_FORMAT}")
        return cls(path, manifest)

    @classmethod
    def find(cls, root: str | os.PathLike, key: str) -> ValueStore | None:
        """The complete store for `key` under `root`, or None (absent, or still being written)."""
        path = Path(root) / key
        if not (path / MANIFEST).is_file():
            return None
        try:
            return cls.open(path)
        except (StoreError, json.JSONDecodeError, KeyError):
            return None

    @property
    def fields(self) -> dict[str, Any]:
        """The key fields this store was computed with."""
        return self.manifest["fields"]

    def __len__(self) -> int:
        return self.num_pairs

    def __contains__(self, i: object) -> bool:
        return isinstance(i, (int, np.integer)) and 0 <= i < self.num_pairs and int(i) not in self.missing

    def _shard(self, s: int) -> RaggedFile:
        if s not in self._shards:
            self._shards[s] = RaggedFile(self.path / shard_name(s))
        return self._shards[s]

    def pair(self, i: int) -> PairValues:
        """Pair `i`'s signals (read-only views into the mapped shard). KeyError if missing."""
        if i not in self:
            why = "the teacher could not take it" if int(i) in self.missing else "out of range"
            raise KeyError(f"pair {i} is not in the store ({why})")
        shard = self._shard(int(i) // self.shard_size)
        row = int(i) % self.shard_size
        return PairValues(**{name: shard.row(name, row) for name in self.arrays})

    def first_nonfinite(self) -> tuple[int, str] | None:
        """(pair index, array name) of the first stored number that is NaN or infinite, or None.
        Reads every shard once (`tvkd.numerics.first_nonfinite` on its flat arrays)."""
        for s in range(-(-self.num_pairs // self.shard_size)):
            shard = self._shard(s)
            name = first_nonfinite({name: shard.flat(name) for name in self.arrays})
            if name is not None:
                row = next(r for r in range(len(shard)) if first_nonfinite({name: shard.row(name, r)}))
                return s * self.shard_size + row, name
        return None

    def response_tokens(self) -> int:
        """Teacher response tokens stored (both sides of every present pair)."""
        return int(self.manifest["response_tokens"])

    def nbytes(self) -> int:
        """Bytes on disk of every file of the store, manifest included."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def bytes_per_response_token(self) -> float:
        return self.nbytes() / max(self.response_tokens(), 1)

    def __repr__(self) -> str:
        return f"ValueStore({str(self.path)!r}, pairs={self.num_pairs}, missing={len(self.missing)})"


class StoreWriter:
    """Writes one store folder: shards (atomically, in any order), then the manifest.

    A one-process precompute holds `acquire()` (the key's lock) around its whole run, so two
    processes asking for the same key never both compute it: the second waits, then sees the
    finished store (`find_complete()`). Processes that share one key's work (torchrun ranks,
    Celery shard tasks) hold `acquire_shard(i)` around each shard instead, and `finalize` under
    `acquire()` once every shard is done (`tvkd.store_lock`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        key: str,
        *,
        fields: Mapping[str, Any],
        num_pairs: int,
        shard_size: int,
        arrays: Sequence[str],
        topk: int = 0,
    ) -> None:
        self.root = Path(root)
        self.key = key
        self.path = self.root / key
        self.fields = dict(fields)
        self.num_pairs = num_pairs
        self.shard_size = shard_size
        self.arrays = sorted(arrays)
        self.topk = topk
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_range(self, i: int) -> range:
        """Pair indices covered by shard `i`."""
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_pairs))

    def acquire(
        self,
        *,
        should_stop: Callable[[], bool] | None = None,
        timeout: float | None = None,
        poll: float = 0.2,
    ) -> contextlib.AbstractContextManager[float]:
        """Hold the key's lock (`tvkd.store_lock.hold`); yields the seconds spent waiting for it."""
        return hold(self.path / KEY_LOCK, should_stop=should_stop, timeout=timeout, poll=poll)

    def acquire_shard(
        self, i: int, *, should_stop: Callable[[], bool] | None = None, poll: float = 0.2
    ) -> contextlib.AbstractContextManager[float]:
        """Hold shard `i`'s lock: whoever holds it computes and writes that shard."""
        return hold(self.path / shard_lock_name(i), should_stop=should_stop, poll=poll)

    def find_complete(self) -> ValueStore | None:
        return ValueStore.find(self.root, self.key)

    def _shard_ok(self, i: int) -> bool:
        """A shard file exists and covers the rows this writer expects (else it is recomputed)."""
        p = self.path / shard_name(i)
        if not p.is_file():
            return False
        try:
            f = RaggedFile(p)
        except (OSError, ValueError, KeyError):
            return False
        # A partial store from a run with another shard_size (not part of the key) is redone.
        return (
            f.rows == len(self.shard_range(i))
            and f.metadata.get("shard_size") == str(self.shard_size)
            and sorted(f.fields) == self.arrays
        )

    def done_shards(self, among: Iterable[int] | None = None) -> set[int]:
        """Shards already on disk (of `among`, default all): a resumed precompute skips them."""
        return {i for i in (range(self.num_shards) if among is None else among) if self._shard_ok(i)}

    def write_shard(
        self,
        i: int,
        records: Sequence[PairValues | None],
        *,
        info: Mapping[str, Any] | None = None,
        made_by: Mapping[str, Any] | None = None,
    ) -> int:
        """Write shard `i` (one record per pair of its range; None = missing). Returns its bytes.

        `info` (JSON-serialisable: issues, teacher tokens) goes into the shard's header, so that
        `finalize` can total it without the writer remembering earlier shards. `made_by` (seconds,
        who computed it) goes there too, with this host and pid added; it is provenance, not
        content, and ends in the manifest's `timings.shards`.
        """
        expected = len(self.shard_range(i))
        if len(records) != expected:
            raise ValueError(f"shard {i} takes {expected} records, got {len(records)}")
        columns: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        missing: list[int] = []
        tokens = 0
        for j, rec in enumerate(records):
            if rec is None:
                missing.append(self.shard_range(i)[j])
                for name in self.arrays:
                    columns[name].append(_empty_row(name, self.topk))
                continue
            tokens += rec.response_tokens()
            for name in self.arrays:
                arr = getattr(rec, name)
                if arr is None:
                    raise ValueError(f"record {j} of shard {i} lacks {name}")
                columns[name].append(_coerce(name, arr))
        meta = {
            "shard": str(i),
            "shard_size": str(self.shard_size),
            "first": str(self.shard_range(i).start),
            "missing": json.dumps(missing),
            "response_tokens": str(tokens),
            "info": json.dumps(dict(info or {})),
            "made_by": json.dumps({**dict(made_by or {}), "host": socket.gethostname(), "pid": os.getpid()}),
        }
        return write_ragged(self.path / shard_name(i), columns, metadata=meta)

    def shard_made_by(self, i: int) -> dict[str, Any]:
        """Who wrote shard `i` and how long it took (`write_shard`'s `made_by`); {} for old stores."""
        return json.loads(RaggedFile(self.path / shard_name(i)).metadata.get("made_by", "{}"))

    def _remove_strays(self) -> None:
        """Drop leftovers of killed writes (*.tmp), shards of an earlier, other-sized run and the
        shard locks (every shard is written: no one computes one again)."""
        keep = {shard_name(i) for i in range(self.num_shards)}
        for p in self.path.iterdir():
            stray_shard = p.name.startswith("shard-") and p.name not in keep
            if p.is_file() and (p.name.endswith(".tmp") or stray_shard or p.name.startswith(".lock-")):
                p.unlink(missing_ok=True)

    def finalize(self, *, timings: Mapping[str, Any] | None = None) -> ValueStore:
        """Write manifest.json (complete=true) once every shard exists; the store is then findable.
        The caller holds `acquire()`. StoreError when a shard is not written."""
        absent = sorted(set(range(self.num_shards)) - self.done_shards())
        if absent:
            raise StoreError(f"cannot finalize {self.path}: shards {absent[:10]} are not written")
        self._remove_strays()
        shards, missing, issues = [], [], []
        tokens = teacher_tokens = 0
        for i in range(self.num_shards):
            f = RaggedFile(self.path / shard_name(i))
            info = f.meta_json("info")
            assert isinstance(info, dict)
            shard_missing = f.meta_json("missing")
            assert isinstance(shard_missing, list)
            missing += shard_missing
            issues += info.get("issues", [])
            tokens += int(f.metadata["response_tokens"])
            teacher_tokens += int(info.get("teacher_tokens", 0))
            shards.append(
                {
                    "file": shard_name(i),
                    "first": self.shard_range(i).start,
                    "rows": f.rows,
                    "bytes": f.path.stat().st_size,
                }
            )
        manifest = {
            "format": STORE_FORMAT,
            "key": self.key,
            "complete": True,
            "fields": self.fields,
            "num_pairs": self.num_pairs,
            "shard_size": self.shard_size,
            "arrays": self.arrays,
            "topk": self.topk,
            "shards": shards,
            "response_tokens": tokens,
            "teacher_tokens": teacher_tokens,
            "missing": missing,
            "issues": issues,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "timings": {
                **dict(timings or {}),
                "shards": [self.shard_made_by(i) for i in range(self.num_shards)],
            },
        }
        write_json_atomic(self.path / MANIFEST, manifest, sort_keys=True, fsync=True)
        return ValueStore.open(self.path)
