"""The locks of a value store folder (`tvkd.store`): one for the key, one per shard.

    <root>/<key>/.lock          the key: held by a one-process precompute for its whole run (so a
                                second process asking for the same key waits, then finds the
                                finished store) and, briefly, by whoever writes the manifest
    <root>/<key>/.lock-00003    shard 3: held while one process computes and writes that shard

Several processes (torchrun ranks, Celery shard tasks) fill one key by taking shard locks: a
process that gets a shard's lock and finds the shard already written skips it, so a shard is
computed once however many processes ask for it. Each lock is an exclusive `fcntl.flock` on
its file; the OS drops it when its holder dies (kill -9 included), so a crash never leaves a
stale lock, and the dead holder's shard is redone by the next process that asks. flock is per
host on most network filesystems: processes on several hosts that share an artifact root need
the queue (one task per shard) to keep them apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

KEY_LOCK = ".lock"


class StoreError(RuntimeError):
    """A store folder is missing, incomplete, or does not match what was asked for."""


class StoreLockTimeout(StoreError):
    """Gave up waiting for another process that holds a store lock (`stopped`: on request)."""

    def __init__(self, message: str, *, stopped: bool = False) -> None:
        super().__init__(message)
        self.stopped = stopped


def shard_lock_name(i: int) -> str:
    """The lock file of shard `i` (next to its shard-XXXXX.safetensors)."""
    return f".lock-{i:05d}"


@contextlib.contextmanager
def hold(
    path: Path,
    *,
    should_stop: Callable[[], bool] | None = None,
    timeout: float | None = None,
    poll: float = 0.2,
) -> Iterator[float]:
    """Hold the exclusive lock on file `path` (created if absent); yields the seconds spent waiting.

    Polls a non-blocking flock so that a cancelled job (should_stop) can give up the wait;
    raises StoreLockTimeout after `timeout` seconds, or with stopped=True when should_stop().
    """
    start = time.monotonic()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while not _try(fd):
            if should_stop is not None and should_stop():
                raise StoreLockTimeout(f"stopped while waiting for the lock {path}", stopped=True)
            if timeout is not None and time.monotonic() - start > timeout:
                raise StoreLockTimeout(f"waited {timeout}s for the lock {path}")
            time.sleep(poll)
        try:
            yield time.monotonic() - start
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def try_hold(path: Path) -> Iterator[bool]:
    """Take the lock on `path` if it is free; yields whether it was taken (then held until exit)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        got = _try(fd)
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
