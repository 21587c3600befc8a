"""The reconciler: a daemon thread in every worker process that makes sure no job is lost.

Every `interval` seconds it looks for jobs that are not terminal and that nothing is working on:

- dead: a lease whose heartbeat is older than TVKD_HEARTBEAT_TIMEOUT (the worker was killed,
  lost power, or its host is gone). The lease is cleared and the job's stage re-sent; the next
  worker resumes it (training from its last checkpoint: the Trainer runs with resume=True).
- lost: no lease, sent more than TVKD_REQUEUE_AFTER ago, and no message for it waiting in the
  queues (Redis restarted or flushed, a filesystem message file removed, the worker died between
  receiving the message and taking the lease). Re-sent. A job legitimately waiting behind others
  still has its message in the queue, which is checked (Redis: LRANGE of the queue lists; the
  embedded broker: its message files) to avoid flooding the queue with duplicates. A transport
  that cannot be inspected gets at most one re-send per REQUEUE_AFTER per job (`enqueued_at` is
  bumped on each), and any duplicate is a no-op for the tasks (lease + stage checks).
- never sent: no lease and no `enqueued_at`, created more than REQUEUE_AFTER ago (the API died
  between the insert and the enqueue). Sent.
- bounded: a job's stage is re-sent at most TVKD_MAX_RESENDS times (dead or lost, counted when
  the publish succeeds, restarted at each new stage); the next time it would be, the job fails
  with error code `retries_exhausted` and its attempts (worker, attempt number, time of each
  start of the stage) in the failure event's data.
- cancel requested with no live lease (e.g. between stages, or its worker died while
  cancelling): finished `cancelled` here, since no worker would otherwise pick it up.
- waiting for the jobs it names (`job:<id>`, service.dependencies): never sent; settled on each
  pass (`jobstate.settle_waiting`: released and sent when they all succeeded, failed when one
  failed or was cancelled). The usual release is at once, by the worker that finishes the last
  of them; this pass covers a reference that finished between a submit's check and its commit.

No leader election: every worker runs a reconciler, and each action on a job is claimed with a
compare-and-set UPDATE on the row (the lease token / heartbeat / enqueued_at it saw), so when
several reconcilers see the same job only one of them re-sends it. `tvkd worker --no-reconciler`
turns it off (e.g. for GPU workers when a CPU worker already runs one).

The embedded broker's processed-message folder is pruned here too.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import SQLAlchemyError

from service import jobstate
from service.db import cached_sessions, transaction
from service.models import Job, utcnow
from service.queue import PUBLISH_ERRORS, embedded_folders, is_embedded, send_stage
from service.settings import Settings
from service.statemachine import FIRST_STAGE, TERMINAL, Status
from worker.dispatch import queued_job_ids

log = logging.getLogger("tvkd.worker.reconciler")
PROCESSED_KEEP_SECONDS = 24 * 3600


def default_interval(settings: Settings) -> float:
    return min(30.0, max(0.5, min(settings.heartbeat_timeout, settings.requeue_after) / 2))


class Reconciler(threading.Thread):
    def __init__(self, app: Celery, settings: Settings, *, interval: float | None = None) -> None:
        super().__init__(name="tvkd-reconciler", daemon=True)
        self.app, self.settings = app, settings
        self.factory = cached_sessions(settings.resolved_database_url)
        self.interval = interval if interval is not None else default_interval(settings)
        self._stop_event = threading.Event()
        self._last_prune = 0.0

    def run(self) -> None:
        log.info("reconciler running every %.1fs", self.interval)
        while not self._stop_event.is_set():
            try:
                self.run_once()
            except SQLAlchemyError as exc:
                log.warning("reconciler: database unavailable (%s); retrying", exc)
            except Exception:  # the thread must survive anything; the next pass retries
                log.exception("reconciler pass failed")
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()

    # ---------------------------------------------------------------------------- one pass

    def run_once(self) -> list[tuple[str, str]]:
        """One pass; returns the (job id, action) pairs it took."""
        now = utcnow()
        dead_before = now - timedelta(seconds=self.settings.heartbeat_timeout)
        lost_before = now - timedelta(seconds=self.settings.requeue_after)
        free = Job.lease_token.is_(None)
        wanted = or_(
            and_(Job.lease_token.is_not(None), Job.heartbeat_at < dead_before),  # dead worker
            and_(free, Job.cancel_requested.is_(True)),  # cancelled while nobody runs it
            and_(free, Job.enqueued_at < lost_before),  # message lost (or waiting: checked below)
            and_(free, Job.enqueued_at.is_(None), Job.created_at < lost_before),  # never sent
        )
        columns = (Job.id, Job.stage, Job.lease_token, Job.heartbeat_at, Job.enqueued_at)
        columns += (Job.cancel_requested, Job.worker)
        live = Job.status.not_in([*TERMINAL, Status.WAITING])
        with self.factory() as session:
            candidates = list(session.execute(select(*columns).where(live, wanted)))
        actions: list[tuple[str, str]] = []
        with transaction(self.factory) as session:
            released = jobstate.settle_waiting(session)
            for job_id in released:
                jobstate.mark_sent(session, job_id)
        for job_id in released:
            self._send(job_id, FIRST_STAGE)
            actions.append((job_id, "released"))
        queued: set[str] | None = None
        inspected = False
        for row in candidates:
            if row.cancel_requested:
                if self._finish_cancelled(row.id, row.lease_token, row.heartbeat_at):
                    actions.append((row.id, "cancelled"))
                continue
            if row.lease_token is not None:
                claimed = self._claim_dead(row.id, row.lease_token, row.heartbeat_at, row.worker)
                what = "requeued_dead"
            else:
                if not inspected:
                    queued, inspected = self._queued(), True
                if queued is not None and row.id in queued:
                    continue  # waiting behind other jobs: its message is there
                claimed = self._claim_lost(row.id, row.enqueued_at)
                what = "requeued_lost"
            if claimed == "exhausted":
                actions.append((row.id, jobstate.RETRIES_EXHAUSTED))
            elif claimed == "resend" and self._send(row.id, row.stage):
                actions.append((row.id, what))
        self._prune_processed()
        for job_id, action in actions:
            log.info("reconciler: %s %s", action, job_id)
        return actions

    def _queued(self) -> set[str] | None:
        try:
            return queued_job_ids(self.app, self.settings)
        except Exception as exc:  # an unreachable broker: the re-send below will fail and retry
            log.warning("reconciler: cannot inspect the queues (%s)", exc)
            return None

    def _finish_cancelled(self, job_id: str, token: str | None, beat: datetime | None) -> bool:
        with transaction(self.factory) as session:
            return jobstate.cancel_unattended(session, job_id, token, beat)

    def _claim_dead(self, job_id: str, token: str, beat: datetime | None, worker: str | None) -> str | None:
        limit = self.settings.max_resends
        with transaction(self.factory) as session:
            return jobstate.reclaim_dead(session, job_id, token, beat, worker, max_resends=limit)

    def _claim_lost(self, job_id: str, sent: datetime | None) -> str | None:
        with transaction(self.factory) as session:
            return jobstate.resend(session, job_id, sent, max_resends=self.settings.max_resends)

    def _send(self, job_id: str, stage: str) -> bool:
        """Re-send the stage and count it (a publish that fails is not counted: a broker outage
        must not use up a job's re-sends)."""
        try:
            send_stage(self.app, job_id, stage)
        except PUBLISH_ERRORS as exc:  # enqueued_at was bumped: the next pass after REQUEUE_AFTER retries
            log.warning("reconciler: cannot send %s (%s)", job_id, exc)
            return False
        with transaction(self.factory) as session:
            jobstate.count_resend(session, job_id)
        return True

    def _prune_processed(self) -> None:
        if not is_embedded(self.settings) or time.monotonic() - self._last_prune < 600:
            return
        self._last_prune = time.monotonic()
        cutoff = time.time() - PROCESSED_KEEP_SECONDS
        for path in Path(embedded_folders(self.settings)["processed"]).glob("*.msg"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                continue
