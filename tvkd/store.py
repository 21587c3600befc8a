"""The teacher value store: content-addressed, memory-mapped, written shard by shard, resumable.

DESIGN.md "Storage": per pair and side, V at each of the T+1 states as flat float32 arrays with
offsets in safetensors files (`tvkd.ragged`), plus a manifest holding the content key. Layout:

    <root>/<key>/shard-00000.safetensors   pairs [0, shard_size)
    <root>/<key>/shard-00001.safetensors   pairs [shard_size, 2·shard_size)  ...
    <root>/<key>/manifest.json             written last: its presence (complete=true) is the commit
    <root>/<key>/.lock                     fcntl lock held by the one process computing this key

The key is a hash of everything that changes the stored numbers (teacher weights, tokenizer and
chat template, dataset, max length, q_source, β_v, top-k, token stats, precision), so the same
request finds the same folder and is never recomputed. Every file appears by an atomic rename, so
a file that exists is whole: a killed precompute leaves finished shards that a rerun keeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tvkd.atomic import write_json_atomic
from tvkd.config import PrecomputeConfig
from tvkd.ragged import RaggedFile, write_ragged

STORE_FORMAT = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
SIDES = ("chosen", "rejected")


class StoreError(RuntimeError):
    """A store folder is missing, incomplete, or does not match what was asked for."""


class StoreLockTimeout(StoreError):
    """Gave up waiting for another process that holds the store's lock (`stopped`: on request)."""

    def __init__(self, message: str, *, stopped: bool = False) -> None:
        super().__init__(message)
        self.stopped = stopped


def content_key(fields: Mapping[str, object]) -> str:
    """sha256 of the canonical JSON of `fields` (+ the store format) → 32 hex characters."""
    payload = {"store_format": STORE_FORMAT, **fields}
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def key_fields(
    *,
    teacher: str,
    teacher_fingerprint: str,
    tokenizer_fingerprint: str,
    dataset_fingerprint: str,
    config: PrecomputeConfig,
    teacher_reference: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Everything that changes the stored numbers, and nothing else.

    batch_tokens, chunk_size and shard_size only change float summation order (and the file
    split), so they stay out: a rerun with a bigger batch finds the same store. bf16 changes the
    teacher's hidden states well beyond float noise, so the precision is in. `teacher_reference`
    (name, weights fingerprint) is in with `q_source="implicit"` (the values are the teacher's
    log-ratio to it). The training-time options γ, terminal and shaping are not: they are applied
    to the stored V when the loss is formed, so one store serves them all. truncation_mode is in
    only when it cuts rows ("none" leaves the keys of earlier stores as they were).
    """
    reference = {}
    if teacher_reference is not None:
        name, fingerprint = teacher_reference
        reference = {"teacher_reference": name, "teacher_reference_fingerprint": fingerprint}
    cut = {} if config.truncation_mode == "none" else {"truncation_mode": config.truncation_mode}
    return {
        **reference,
        **cut,
        "teacher": str(teacher),
        "teacher_fingerprint": teacher_fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "max_length": int(config.max_length),
        "q_source": config.q_source,
        # float() so that value_beta=1 and value_beta=1.0 hash alike
        "value_beta": float(config.value_beta),
        "topk": int(config.topk),
        "token_stats": bool(config.token_stats),
        "precision": "bf16" if config.bf16 else "fp32",
    }


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
        Reads every shard once (vectorised)."""
        for s in range(-(-self.num_pairs // self.shard_size)):
            shard = self._shard(s)
            for name in self.arrays:
                if np.isfinite(np.asarray(shard.flat(name), dtype=np.float64)).all():
                    continue
                for r in range(len(shard)):
                    if not np.isfinite(np.asarray(shard.row(name, r), dtype=np.float64)).all():
                        return s * self.shard_size + r, name
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

    Hold `acquire()` around the whole computation: it takes an exclusive `fcntl.flock` on
    <root>/<key>/.lock, so two processes asking for the same key never both compute it; the second
    waits, then sees the finished store (`find_complete()`). The OS drops the lock when its holder
    dies, so a crash never leaves a stale lock. (flock is per host on most network filesystems: a
    shared artifact root across hosts needs one precompute per key scheduled by the queue.)
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

    @contextlib.contextmanager
    def acquire(
        self,
        *,
        should_stop: Callable[[], bool] | None = None,
        timeout: float | None = None,
        poll: float = 0.2,
    ) -> Iterator[float]:
        """Hold the key's lock; yields the seconds spent waiting for it.

        Polls a non-blocking flock so that a cancelled job (should_stop) can give up the wait;
        raises StoreLockTimeout after `timeout` seconds, or with stopped=True when should_stop().
        """
        start = time.monotonic()
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if should_stop is not None and should_stop():
                        raise StoreLockTimeout(
                            f"stopped while waiting for the lock on {self.path}", stopped=True
                        ) from None
                    if timeout is not None and time.monotonic() - start > timeout:
                        raise StoreLockTimeout(f"waited {timeout}s for the lock on {self.path}") from None
                    time.sleep(poll)
            try:
                yield time.monotonic() - start
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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

    def done_shards(self) -> set[int]:
        """Shards already on disk (a resumed precompute skips them)."""
        return {i for i in range(self.num_shards) if self._shard_ok(i)}

    def write_shard(
        self,
        i: int,
        records: Sequence[PairValues | None],
        *,
        info: Mapping[str, Any] | None = None,
    ) -> int:
        """Write shard `i` (one record per pair of its range; None = missing). Returns its bytes.

        `info` (JSON-serialisable: issues, teacher tokens, seconds) goes into the shard's header,
        so that `finalize` can total it without the writer remembering earlier shards.
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
        }
        return write_ragged(self.path / shard_name(i), columns, metadata=meta)

    def _remove_strays(self) -> None:
        """Drop leftovers of killed writes (*.tmp) and shards of an earlier, other-sized run."""
        keep = {shard_name(i) for i in range(self.num_shards)}
        for p in self.path.iterdir():
            stray_shard = p.name.startswith("shard-") and p.name not in keep
            if p.is_file() and (p.name.endswith(".tmp") or stray_shard):
                p.unlink(missing_ok=True)

    def finalize(self, *, timings: Mapping[str, Any] | None = None) -> ValueStore:
        """Write manifest.json (complete=true) once every shard exists; the store is then findable."""
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
            "timings": dict(timings or {}),
        }
        write_json_atomic(self.path / MANIFEST, manifest, sort_keys=True, fsync=True)
        return ValueStore.open(self.path)
