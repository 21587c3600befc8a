"""Running a chat template under a time and a memory limit.

A chat template is code that comes with a model folder: Jinja's sandbox stops it from reaching
Python objects, but not from looping (two nested `range(100000)` loops are legal) or from
growing memory. `limited` runs a call (`apply_chat_template`) registered with one watchdog
thread per process, which every 20 ms checks each running call's deadline and the process's
resident-memory growth since it first saw the call; past either, it raises `TemplateTimeout` or
`TemplateMemory` inside the calling thread (`PyThreadState_SetAsyncExc`: delivered at the
template's next bytecode, in a worker process's main thread as in an API thread). A call within
its limits costs two dictionary operations: nothing traces it (a `sys.settrace` guard made
tokenizing conversational pairs 1.9x slower).

The limits: `TVKD_TEMPLATE_SECONDS` (default 5 s per rendering) and `TVKD_TEMPLATE_MEMORY_MB`
(default 1024 MB of resident-memory growth), read at each call. One operation in C (a string
repeated a billion times) is interrupted only when it returns.

A caller that can be stopped (a worker's job: cancel, shutdown) wraps its work in
`stop_when(should_stop)`: the watchdog also polls `should_stop()` for every rendering of that
thread and, once it is True, raises `TemplateStopped` there, so a cancel does not wait for the
time limit. `TemplateStopped` is a BaseException (like KeyboardInterrupt): no handler of bad rows
or template errors (`except Exception`) turns it into a bad row.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_POLL_SECONDS = 0.02


class TemplateLimit(Exception):
    """A chat template ran past its time or memory limit; `limit` is "time" or "memory"."""

    limit = ""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__doc__ or "")


class TemplateTimeout(TemplateLimit):
    """the chat template ran longer than TVKD_TEMPLATE_SECONDS"""

    limit = "time"


class TemplateMemory(TemplateLimit):
    """the chat template grew memory by more than TVKD_TEMPLATE_MEMORY_MB"""

    limit = "memory"


class TemplateStopped(BaseException):
    """the caller asked to stop (`stop_when`) while a chat template was rendering"""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__doc__ or "")


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def template_limits() -> tuple[float, int]:
    """(seconds, bytes) from TVKD_TEMPLATE_SECONDS and TVKD_TEMPLATE_MEMORY_MB."""
    seconds = float(os.environ.get("TVKD_TEMPLATE_SECONDS", "5"))
    megabytes = float(os.environ.get("TVKD_TEMPLATE_MEMORY_MB", "1024"))
    return seconds, int(megabytes * (1 << 20))


@dataclass
class _Call:
    thread_id: int
    deadline: float
    max_bytes: int
    rss0: int | None = None  # sampled by the watchdog when it first sees the call
    fired: type[BaseException] | None = None
    stop: Callable[[], bool] | None = None  # the thread's `stop_when` function, if any


_lock = threading.Lock()
_local = threading.local()  # .stop: the innermost `stop_when` function of this thread
_calls: dict[int, _Call] = {}  # id of the _Call's token → the call
_watchdog: threading.Thread | None = None


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None
    )


def _watch() -> None:
    while True:
        time.sleep(_POLL_SECONDS)
        with _lock:
            if not _calls:
                continue
            now, rss = time.monotonic(), _rss()
            for call in _calls.values():
                if call.fired is not None:
                    continue
                if call.rss0 is None:
                    call.rss0 = rss
                if now > call.deadline:
                    call.fired = TemplateTimeout
                elif rss - call.rss0 > call.max_bytes:
                    call.fired = TemplateMemory
                elif call.stop is not None and _asks(call.stop):
                    call.fired = TemplateStopped
                if call.fired is not None:
                    _raise_in(call.thread_id, call.fired)


def _asks(should_stop: Callable[[], bool]) -> bool:
    try:
        return bool(should_stop())
    except Exception:  # a broken predicate must not kill the watchdog (and so every limit)
        return False


@contextmanager
def stop_when(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within the block, a chat template rendering (`limited`) of the calling thread ends with
    `TemplateStopped` within ~20 ms of `should_stop()` turning True. `should_stop` runs in the
    watchdog thread, every 20 ms while a rendering runs: it must be quick (read flags)."""
    previous = getattr(_local, "stop", None)
    _local.stop = should_stop
    try:
        yield
    finally:
        _local.stop = previous


def _ensure_watchdog() -> None:
    global _watchdog
    if _watchdog is None or not _watchdog.is_alive():
        _watchdog = threading.Thread(target=_watch, name="tvkd-template-watchdog", daemon=True)
        _watchdog.start()


def limited(call: Callable[[], T], *, seconds: float | None = None, max_bytes: int | None = None) -> T:
    """`call()` under the template limits (defaults: `template_limits()`); raises
    TemplateTimeout or TemplateMemory (both TemplateLimit) when it runs past one, and
    TemplateStopped when the thread's `stop_when` function says stop."""
    default_seconds, default_bytes = template_limits()
    entry = _Call(
        threading.get_ident(),
        time.monotonic() + (default_seconds if seconds is None else seconds),
        default_bytes if max_bytes is None else max_bytes,
        stop=getattr(_local, "stop", None),
    )
    token = id(entry)
    with _lock:
        _ensure_watchdog()
        _calls[token] = entry
    try:
        return call()
    finally:
        with _lock:
            del _calls[token]
            if entry.fired is not None:  # fired but not yet delivered: it must not escape later
                _raise_in(entry.thread_id, None)
