"""Progress, metrics and events out of a job; a cooperative stop request in.

The library reports through one small interface so that the same code drives a terminal (the
CLI's `PrintCallbacks`), a Celery worker writing to the database, or a test recording calls.
`Callbacks` is a no-op base: subclass it and override what you need. `CallbackList` fans calls
out to several; a stop is requested when any of them asks for one.

Stages are named as in DESIGN.md's job path: "validate", "precompute", "reference", "train",
"evaluate", "samples", "save".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Literal, TextIO

Split = Literal["train", "eval", "teacher"]  # "teacher": the precompute's teacher check, at step 0
Level = Literal["info", "warning", "error"]


class Callbacks:
    """No-op base. Every hook is optional; hooks must be cheap (they run inside the loop)."""

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        """A stage starts (`info` says what it will do, e.g. {"pairs": 64, "steps": 40})."""

    def on_progress(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        """`done` of `total` units of `stage` are finished; `eta_seconds` None when unknown."""

    def _progress_line(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        import time

        now = time.monotonic()
        last = self._last_line
        if last is not None and last[0] == stage and done < total and now - last[1] < self.PROGRESS_SECONDS:
            return
        self._last_line = (stage, now)
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        eta = f", eta {eta_seconds:.0f} s" if eta_seconds is not None and done < total else ""
        self._write(f"[progress] {stage} {done}/{total}{pct}{eta}")

    def on_metrics(self, step: int, metrics: dict[str, float], split: Split) -> None:
        """Training metrics every `log_every` optimizer steps, held-out metrics, or (split
        "teacher", step 0) the teacher check of `tvkd.teacher_check`."""

    def on_event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        """Something a user should read: dropped rows, warnings, resumes, failures."""

    def on_checkpoint(self, step: int, path: str) -> None:
        """A complete checkpoint now exists at `path`."""

    def should_stop(self) -> bool:
        """Polled once per optimizer step (and per batch of the long passes); True ⇒ save and stop."""
        return False


class CallbackList(Callbacks):
    """Several callbacks as one."""

    def __init__(self, callbacks: Iterable[Callbacks | None]) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_stage(stage, info)

    def on_progress(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        for c in self.callbacks:
            c.on_progress(stage, done, total, eta_seconds)

    def on_metrics(self, step: int, metrics: dict[str, float], split: Split) -> None:
        for c in self.callbacks:
            c.on_metrics(step, metrics, split)

    def on_event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        for c in self.callbacks:
            c.on_event(level, message, data)

    def on_checkpoint(self, step: int, path: str) -> None:
        for c in self.callbacks:
            c.on_checkpoint(step, path)

    def should_stop(self) -> bool:
        # Ask every callback (no short-circuit): a callback may latch the request when asked.
        return any([c.should_stop() for c in self.callbacks])


# The metrics a terminal line shows, in this order (the full dict goes to result.json).
LINE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "tvkd/shaped_accuracy",
    "tvkd/shaping_accuracy",
    "nll/chosen",
    "grad_norm",
    "lr",
)


def format_metrics(metrics: dict[str, float], names: Iterable[str] = LINE_METRICS) -> str:
    parts = []
    for name in names:
        if name in metrics:
            value = metrics[name]
            parts.append(f"{name}={value:.3g}" if name == "lr" else f"{name}={value:.4f}")
    return " ".join(parts)


class PrintCallbacks(Callbacks):
    """Terminal output: one tqdm bar per stage, a line per metrics report, events as lines.
    When the stream is not a terminal (a log file, a pipe), progress is a plain line
    `[progress] STAGE done/total (pct), eta N s` every PROGRESS_SECONDS and at a stage's end.

    `stop()` requests a cooperative stop (the CLI calls it from its SIGINT handler).
    """

    def __init__(self, stream: TextIO | None = None, *, bars: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.bars = bars
        self._bar: Any = None
        self._bar_stage: str | None = None
        self._stop = False
        isatty = getattr(self.stream, "isatty", None)
        self._terminal = bool(isatty and isatty())
        self._last_line: tuple[str, float] | None = None

    PROGRESS_SECONDS = 5.0

    def _write(self, text: str) -> None:
        from tqdm import tqdm

        # tqdm.write keeps an active bar intact below the printed line.
        tqdm.write(text, file=self.stream)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_stage = None, None

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self._close_bar()
        details = " ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list)))
        self._write(f"== {stage} {details}".rstrip())

    def on_progress(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        if not self.bars:
            return
        if not self._terminal:
            self._progress_line(stage, done, total, eta_seconds)
            return
        from tqdm import tqdm

        if self._bar_stage != stage or self._bar is None or self._bar.total != total:
            self._close_bar()
            self._bar = tqdm(total=total, desc=stage, file=self.stream, leave=False, dynamic_ncols=True)
            self._bar_stage = stage
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self._close_bar()

    def on_metrics(self, step: int, metrics: dict[str, float], split: Split) -> None:
        names = metrics if split == "teacher" else LINE_METRICS
        self._write(f"[{split} step {step}] {format_metrics(metrics, names)}")

    def on_event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        self._write(f"[{level}] {message}")

    def on_checkpoint(self, step: int, path: str) -> None:
        self._write(f"[checkpoint] step {step}: {path}")

    def stop(self) -> None:
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop

    def close(self) -> None:
        self._close_bar()
