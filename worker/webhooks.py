"""The webhook sender: a daemon thread in every worker process (beside the reconciler) that POSTs
the due rows of the webhook outbox (service/webhooks.py) and records each attempt.

A pass claims up to `BATCH` due deliveries (compare-and-set on their next attempt time, so two
senders never send one attempt twice), POSTs each with httpx (TVKD_WEBHOOK_TIMEOUT), and writes
the result: delivered on a 2xx; otherwise the next attempt after the backoff, or failed after
TVKD_WEBHOOK_ATTEMPTS. It runs whatever the jobs do (a worker busy training still delivers).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from service import webhooks
from service.db import cached_sessions, transaction
from service.models import JobWebhook
from service.settings import Settings

log = logging.getLogger("tvkd.worker.webhooks")
BATCH = 20


class WebhookSender(threading.Thread):
    def __init__(self, settings: Settings, *, interval: float = 0.5) -> None:
        super().__init__(name="tvkd-webhooks", daemon=True)
        self.settings, self.interval = settings, interval
        self.factory = cached_sessions(settings.resolved_database_url)
        self._stop_event = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.settings.webhook_timeout, follow_redirects=False) as client:
            while not self._stop_event.is_set():
                try:
                    sent = self.run_once(client)
                except SQLAlchemyError as exc:
                    log.warning("webhooks: database unavailable (%s); retrying", exc)
                    sent = 0
                except Exception:  # the thread must survive anything; the next pass retries
                    log.exception("webhook pass failed")
                    sent = 0
                if not sent:
                    self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()

    def run_once(self, client: object) -> int:
        """One pass; returns how many deliveries it attempted."""
        s = self.settings
        hold = s.webhook_timeout + 30.0  # a sender that dies mid-POST frees the row after this
        with transaction(self.factory) as session:
            claimed = []
            for d in webhooks.claim_due(session, limit=BATCH, hold=hold):
                hook = session.get(JobWebhook, d.job_id)
                target = (hook.url, hook.secret) if hook is not None else None
                claimed.append((d.id, webhooks.Outgoing.of(d), target))
        for delivery_id, outgoing, target in claimed:
            t0 = time.perf_counter()
            if target is None:
                code, error = None, "the job has no webhook any more"
            else:
                code, error = webhooks.post(client, outgoing, *target, s.webhook_allowed_hosts)
            with transaction(self.factory) as session:
                state = webhooks.record_attempt(
                    session,
                    delivery_id,
                    status_code=code,
                    error=error,
                    seconds=time.perf_counter() - t0,
                    max_attempts=s.webhook_attempts,
                    base=s.webhook_backoff,
                    cap=s.webhook_backoff_max,
                )
            log.info("webhook %s of %s (%s): %s", outgoing.event_id, outgoing.job_id, outgoing.status, state)
        return len(claimed)
