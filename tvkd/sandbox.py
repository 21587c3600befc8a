"""Running a chat template under a time and a memory limit.

A chat template is code that comes with a model folder: Jinja's sandbox stops it from reaching
Python objects, but not from looping (two nested `range(100000)` loops are legal) or from
growing memory. `limited` runs a call (`apply_chat_template`) with a trace function on the
calling thread only (`sys.settrace` is per thread, so it works in a worker process as in an API
thread) that every 256 trace events checks the time, and every 4096 the process's resident
memory, and raises `TemplateLimit` inside the template once either is past its limit. Only
frames of compiled templates (file name "<template>") are traced line by line, so the cost
outside the template is one call event per Python call.

The limits: `TVKD_TEMPLATE_SECONDS` (default 5 s per rendering) and `TVKD_TEMPLATE_MEMORY_MB`
(default 1024 MB of resident-memory growth), read at each call.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
TEMPLATE_FILES = ("<template>",)  # jinja2's file name for templates compiled from a string
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class TemplateLimit(Exception):
    """A chat template ran past its time or memory limit; `limit` is "time" or "memory"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


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


class _Guard:
    def __init__(self, seconds: float, max_bytes: int) -> None:
        self.seconds, self.max_bytes = seconds, max_bytes
        self.deadline = time.monotonic() + seconds
        self.rss0 = _rss()
        self.events = 0

    def check(self) -> None:
        self.events += 1
        if self.events & 255:
            return
        if time.monotonic() > self.deadline:
            raise TemplateLimit(
                "time", f"the chat template ran longer than {self.seconds:g} s (TVKD_TEMPLATE_SECONDS)"
            )
        if not self.events & 4095 and _rss() - self.rss0 > self.max_bytes:
            mb = self.max_bytes >> 20
            why = f"the chat template grew memory by more than {mb} MB (TVKD_TEMPLATE_MEMORY_MB)"
            raise TemplateLimit("memory", why)

    def on_call(self, frame: Any, event: str, arg: Any) -> Any:
        self.check()
        return self.on_line if frame.f_code.co_filename in TEMPLATE_FILES else None

    def on_line(self, frame: Any, event: str, arg: Any) -> Any:
        self.check()
        return self.on_line


def limited(call: Callable[[], T], *, seconds: float | None = None, max_bytes: int | None = None) -> T:
    """`call()` under the template limits (defaults: `template_limits()`); raises TemplateLimit."""
    default_seconds, default_bytes = template_limits()
    guard = _Guard(
        default_seconds if seconds is None else seconds, default_bytes if max_bytes is None else max_bytes
    )
    previous = sys.gettrace()
    sys.settrace(guard.on_call)
    try:
        return call()
    finally:
        sys.settrace(previous)
