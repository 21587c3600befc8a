"""What a running stage writes to the database: `JobReporter` (the library's Callbacks → events,
progress, metric points, checkpoints) and `Heartbeat` (keeps the lease alive, reads cancel).

The training loop calls the callbacks from its own thread, many times a second on small models,
so progress and metric points are buffered and written at most every `flush_seconds` (and
always before an event, a checkpoint, a stage change and at the end). Metric points and
checkpoint rows are upserts on their unique keys: a resumed run that re-logs a step overwrites
it. Every write is one transaction retried on a transient database error (service.db.
in_transaction: a dropped connection or a database restart during training costs a pause, not
the job). Job-row changes (progress, the lease's heartbeat) go through service.jobstate and are
conditional on the lease token, so a worker that lost its lease (taken over after its heartbeat
went silent) cannot overwrite the new holder's state.

The job's status and stage are not the reporter's business: the stage task shows its stage's
status when it starts and the next one's when it ends (service.jobstate). The library's own
steps inside a stage (`on_stage`: e.g. "reference" and "train" inside the train stage) are
events, with the step in their data.

`should_stop()` is True when the user cancelled (read by the heartbeat thread) or the worker is
shutting down; when the lease was lost it raises `LeaseLost` instead, which aborts the stage at
once without the trainer writing a "stop" checkpoint over the new holder's output.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.db import in_transaction
from service.jobstate import add_event, heartbeat, set_progress
from service.models import Checkpoint, Job, MetricPoint, utcnow
from tvkd.callbacks import Callbacks

log = logging.getLogger("tvkd.worker")

# Set by the worker_shutting_down signal (worker.tasks): running stages stop at their next step
# and hand their job back to the queue.
SHUTDOWN = threading.Event()


class LeaseLost(Exception):
    """Another worker took the job over (this one's heartbeat was late): stop, write nothing."""


class StopFlags:
    """Why a running stage should stop. Written by the heartbeat thread, read by the stage."""

    def __init__(self) -> None:
        self.cancel = False
        self.lease_lost = False

    @property
    def shutdown(self) -> bool:
        return SHUTDOWN.is_set()

    @property
    def requested(self) -> bool:
        return self.cancel or self.shutdown


def upsert(
    session: Session,
    model: type[Any],
    rows: Sequence[dict[str, Any]],
    *,
    keys: Sequence[str],
    update_cols: Iterable[str],
) -> None:
    """INSERT … ON CONFLICT (keys) DO UPDATE, on PostgreSQL and SQLite."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    stmt = insert(model).values(list(rows))
    cols = list(update_cols)
    if cols:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)


def relative_path(path: str | Path, root: Path) -> str:
    """`path` relative to the artifact root (as stored), or as given when outside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return str(resolved)


class Heartbeat(threading.Thread):
    """Refreshes the job's lease every `interval` seconds and watches `cancel_requested`.

    Wakes at least once a second (cancel latency), beats when a beat is due. A beat that finds
    the lease gone sets `flags.lease_lost` and ends the thread. A database error is logged and
    retried at the next wake: if the database stays away longer than the heartbeat timeout,
    another worker may take the job over, which the next successful beat finds out.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        token: str,
        flags: StopFlags,
        *,
        interval: float,
    ) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.factory, self.job_id, self.token, self.flags = factory, job_id, token, flags
        self.interval = max(0.05, interval)
        self.wake = min(self.interval, 1.0)
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop_event.wait(self.wake):
            try:
                with self.factory() as session, session.begin():
                    if time.monotonic() - last_beat >= self.interval - 1e-3:
                        if not heartbeat(session, self.job_id, self.token):
                            self.flags.lease_lost = True
                            log.warning("job %s: lease lost (taken over by another worker)", self.job_id)
                            return
                        last_beat = time.monotonic()
                    if session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                        self.flags.cancel = True
            except SQLAlchemyError as exc:
                log.warning("job %s: heartbeat failed (%s); retrying", self.job_id, exc)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)


class JobReporter(Callbacks):
    """The library's callbacks, written to the database for one job while one stage runs."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        token: str,
        stage: str,
        flags: StopFlags,
        *,
        artifact_root: Path,
        flush_seconds: float = 0.5,
        checkpoint_every: int = 0,
        quiet: bool = False,
    ) -> None:
        self.factory, self.job_id, self.token, self.stage = factory, job_id, token, stage
        self.flags = flags
        self.artifact_root = artifact_root
        self.flush_seconds = flush_seconds
        self.checkpoint_every = checkpoint_every
        self.quiet = quiet  # drop events and progress (a stage re-running an earlier one's checks)
        self._progress: tuple[int, int, float | None] | None = None
        self._metrics: dict[tuple[str, int, str], float] = {}
        self._last_flush = 0.0

    def silent(self) -> JobReporter:
        """A reporter for this job that records nothing (but still stops when asked)."""
        twin = JobReporter(
            self.factory, self.job_id, self.token, self.stage, self.flags,
            artifact_root=self.artifact_root, quiet=True,
        )  # fmt: skip
        return twin

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        if self.quiet or self.flags.lease_lost:
            return
        self.flush()
        data = _jsonable(data or {})
        job, stage = self.job_id, self.stage
        in_transaction(
            self.factory,
            lambda session: add_event(session, job, message, level=level, stage=stage, data=data),
            what=f"job {job}: event",
        )

    def flush(self) -> None:
        """Write the buffered progress and metric points now."""
        progress, metrics = self._progress, self._metrics
        self._progress, self._metrics = None, {}
        self._last_flush = time.monotonic()
        if self.quiet or self.flags.lease_lost or (progress is None and not metrics):
            return
        rows = [
            {"job_id": self.job_id, "split": split, "step": step, "name": name, "value": value}
            for (split, step, name), value in metrics.items()
        ]

        def write(session: Session) -> None:
            if progress is not None:
                done, total, eta = progress
                set_progress(session, self.job_id, self.token, done, total, eta)
            upsert(
                session,
                MetricPoint,
                rows,
                keys=("job_id", "split", "step", "name"),
                update_cols=("value", "created_at"),
            )

        in_transaction(self.factory, write, what=f"job {self.job_id}: progress and metrics")

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def close(self) -> None:
        try:
            self.flush()
        except SQLAlchemyError as exc:
            log.warning("job %s: could not write the last progress/metrics (%s)", self.job_id, exc)

    # ---------------------------------------------------------------- Callbacks

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        """A step of the library inside this stage (e.g. the reference pass, then training)."""
        if self.quiet:
            return
        self.flush()
        details = ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, dict | list))
        self.event(
            "info", f"{stage} started" + (f" ({details})" if details else ""), {"stage": stage, **info}
        )
        self._progress = (0, 0, None)

    def on_progress(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        self._progress = (int(done), int(total), float(eta_seconds) if eta_seconds is not None else None)
        # The trainer saves a checkpoint right after reporting a step that is a multiple of
        # save_every; a resume restarts after it, so every metric point up to it must be in the
        # database first (a kill between the checkpoint and a later flush would lose them).
        at_checkpoint = stage == "train" and self.checkpoint_every and done % self.checkpoint_every == 0
        if done >= total or at_checkpoint:
            if self.flags.lease_lost:
                # The flush below would drop these points, and the checkpoint that follows would
                # let the new holder resume past them: stop before the trainer writes it.
                raise LeaseLost(self.job_id)
            self.flush()
        else:
            self._maybe_flush()

    def on_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        for name, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):  # JSON has no NaN/Inf
                self._metrics[(split, int(step), name)] = float(value)
        if split == "eval":
            self.flush()
        else:
            self._maybe_flush()

    def on_event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.event(level, message, data)

    def on_checkpoint(self, step: int, path: str) -> None:
        if self.quiet or self.flags.lease_lost:
            return
        self.flush()
        rel = relative_path(path, self.artifact_root)

        def write(session: Session) -> None:
            upsert(
                session,
                Checkpoint,
                [{"job_id": self.job_id, "step": int(step), "path": rel, "created_at": utcnow()}],
                keys=("job_id", "step"),
                update_cols=("path", "created_at"),
            )
            # The trainer keeps only the newest few checkpoints on disk: list only those.
            rows = session.execute(
                select(Checkpoint.id, Checkpoint.path).where(Checkpoint.job_id == self.job_id)
            ).all()
            gone = [row.id for row in rows if not (self.artifact_root / row.path).is_dir()]
            if gone:
                session.execute(delete(Checkpoint).where(Checkpoint.id.in_(gone)))

        in_transaction(self.factory, write, what=f"job {self.job_id}: checkpoint")

    def should_stop(self) -> bool:
        if self.flags.lease_lost:
            raise LeaseLost(self.job_id)
        if self.flags.requested:
            self.flush()  # before the trainer writes its stop checkpoint (see on_progress)
            return True
        return False


def _jsonable(value: Any) -> Any:
    """Event data as JSON: paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    return str(value)


__all__ = ["SHUTDOWN", "Heartbeat", "JobReporter", "LeaseLost", "StopFlags", "upsert"]
