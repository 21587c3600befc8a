"""How values of the API are written on the pages: durations, times, statuses, job labels."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

# Streamlit's badge colours per status; the statuses themselves come from the API.
STATUS_COLOURS = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "gray",
    "cancelling": "orange",
    "waiting": "orange",
    "validating": "blue",
    "queued": "blue",
    "precomputing": "violet",
    "training": "violet",
    "evaluating": "violet",
}


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(value: str | None) -> str:
    """`2026-11-26 20:24:48 UTC`, or an em dash."""
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else "—"


def duration(seconds: float | None) -> str:
    """`1h 02m`, `3m 05s`, `12s`; an em dash when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def badge(status: str) -> str:
    """Markdown for a coloured status badge."""
    return f":{STATUS_COLOURS.get(status, 'gray')}-badge[{status}]"


def is_active(job: dict[str, Any]) -> bool:
    """Still running or waiting to run: the API sets `finished_at` when a job ends."""
    return not job.get("finished_at")


def progress_text(job: dict[str, Any]) -> str:
    """`train 12/40 · ETA 1m 05s` from the job's `progress` (as the API computed it)."""
    p = job.get("progress") or {}
    done, total = p.get("done", 0), p.get("total", 0)
    text = f"{job.get('stage', '')} {done}/{total}" if total else f"{job.get('stage', '')}"
    if is_active(job) and p.get("eta_seconds") is not None:
        text += f" · ETA {duration(p['eta_seconds'])}"
    return text.strip()


def settings_text(job: dict[str, Any]) -> str:
    """`α=0.7 β=0.1` (a TVKD job), `DPO β=0.1` (kind dpo) or `SFT` (kind sft, no α or β)."""
    kind = job.get("kind") or "tvkd"
    if kind == "sft" or job.get("alpha") is None:
        return kind.upper()
    ab = f"α={job['alpha']:g} β={job['beta']:g}"
    return ab if kind == "tvkd" else f"{kind.upper()} {ab}"


def job_label(job: dict[str, Any]) -> str:
    """`job_73278e29… · α=0.7 β=0.1 · succeeded`: enough to tell an α sweep apart."""
    return f"{short_id(job['id'])} · {settings_text(job)} · {job.get('status')}"


def short_id(job_id: str, n: int = 12) -> str:
    return job_id if len(job_id) <= n + 4 else job_id[: n + 4] + "…"


def number(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return "—"
    return f"{x:.{digits}g}"
