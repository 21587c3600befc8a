"""Webhooks: a signed POST to a job's URL at each change of its status.

- What: `{"id": "evt_…", "type": "job.status_changed", "created": <unix s>, "data": {"job_id",
  "status", "previous_status", "stage"}}`, JSON.
- Signed as Stripe signs: header `Tvkd-Signature: t=<unix s>,v1=<hex>`, the hex being
  HMAC-SHA256(secret, f"{t}.{body}"). A receiver recomputes it (`verify_signature`) and refuses
  a stale `t` (replays). The secret is the job's (`webhook.secret` of the request) or the
  server's `TVKD_WEBHOOK_SECRET`; the API never shows it.
- When: the status change and its delivery row are written in one transaction (an outbox:
  `service.jobstate` calls `on_status`), so no change is lost and none is sent for a rolled-back
  one; each worker's webhook sender (worker/webhooks.py) POSTs due rows, and a failed attempt
  (connection refused, timeout, a non-2xx answer) is retried after 2, 4, 8 … s (capped at
  `TVKD_WEBHOOK_BACKOFF_MAX`), `TVKD_WEBHOOK_ATTEMPTS` attempts in all, then the row is `failed`.
  Nothing of this touches the job: a receiver that is down only fills the delivery log
  (`GET /v1/jobs/{id}/webhooks`).
- Where to: only loopback hosts (127.0.0.0/8, ::1, localhost) unless the host is in
  `TVKD_WEBHOOK_ALLOWED_HOSTS`; checked at submit (422 naming `webhook.url`) and again, on the
  resolved addresses, before each POST.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session

from service.models import Job, JobWebhook, WebhookDelivery, new_id, utcnow

SIGNATURE_HEADER = "Tvkd-Signature"
EVENT_HEADER = "Tvkd-Event-Id"
EVENT = "job.status_changed"
MIN_SECRET = 16


class WebhookError(ValueError):
    """A webhook URL or secret that cannot be used (`field` names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# -------------------------------------------------------------------------------------------- signing


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `Tvkd-Signature` header value of `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance: float = 300.0, now: float | None = None
) -> bool:
    """For receivers: True when `header` signs `body` with `secret` and is at most `tolerance`
    seconds old (constant-time comparison)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


# -------------------------------------------------------------------------------------------- where to


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL if it may receive webhooks (http/https, a loopback or allow-listed host); raises
    WebhookError naming `webhook.url` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError("webhook.url", f"an http(s) URL with a host is needed; got {url!r}")
    if parts.username or parts.password:
        raise WebhookError("webhook.url", "credentials in the URL are not accepted: sign with the secret")
    host = parts.hostname
    if not _loopback(host) and host.lower() not in {h.lower() for h in allowed_hosts}:
        raise WebhookError(
            "webhook.url",
            f"host {host!r} is not allowed: webhooks go to loopback hosts and to the hosts the server "
            "allows (TVKD_WEBHOOK_ALLOWED_HOSTS)",
        )
    return url


def resolved_ok(url: str, allowed_hosts: list[str]) -> str | None:
    """None when the URL's host may be reached now; else why not. A host that is not allow-listed
    must resolve to loopback addresses only (a name cannot be re-pointed elsewhere later)."""
    host = urlsplit(url).hostname or ""
    if host.lower() in {h.lower() for h in allowed_hosts}:
        return None
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        return f"cannot resolve {host!r}: {exc}"
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return f"{host!r} resolves to non-loopback addresses {sorted(addresses)} and is not allow-listed"
    return None


# -------------------------------------------------------------------------------------------- outbox


def on_status(job: Job, previous: str | None) -> None:
    """Queue a delivery of the job's new status when it has a webhook (called by service.jobstate
    with the job attached to the session of the change; written with that transaction)."""
    session = object_session(job)
    if session is None:
        return
    with session.no_autoflush:
        hook = session.get(JobWebhook, job.id)
        if hook is None:
            hook = next((o for o in session.new if isinstance(o, JobWebhook) and o.job_id == job.id), None)
    if hook is None:
        return
    queue_delivery(session, job, previous)


def queue_delivery(session: Session, job: Job, previous: str | None) -> WebhookDelivery:
    delivery = WebhookDelivery(job_id=job.id, event_id=new_id("evt"), event=EVENT, status=job.status, log=[])
    delivery.payload = {
        "id": delivery.event_id,
        "type": EVENT,
        "created": int(time.time()),
        "data": {"job_id": job.id, "status": job.status, "previous_status": previous, "stage": job.stage},
    }
    session.add(delivery)
    return delivery


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before attempt `attempts + 1`: base·2^(attempts−1), at most `cap`."""
    return min(cap, base * 2 ** max(0, attempts - 1))


def claim_due(session: Session, *, limit: int, hold: float) -> list[WebhookDelivery]:
    """Pending deliveries that are due, each claimed for `hold` seconds by moving its
    next_attempt_at (compare-and-set, so two senders never POST the same attempt)."""
    now = utcnow()
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.id)
        .limit(limit)
    ).all()
    claimed = []
    for row in rows:
        seen = row.next_attempt_at
        done = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == row.id, WebhookDelivery.next_attempt_at == seen)
            .values(next_attempt_at=now + timedelta(seconds=hold))
            .execution_options(synchronize_session=False)
        ).rowcount
        if done:
            claimed.append(row)
    return claimed


def record_attempt(
    session: Session,
    delivery_id: int,
    *,
    status_code: int | None,
    error: str | None,
    seconds: float,
    max_attempts: int,
    base: float,
    cap: float,
    at: datetime | None = None,
) -> str:
    """Write one attempt's result; returns the delivery's state afterwards."""
    row = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if row is None:
        return "gone"
    at = at or utcnow()
    row.attempts += 1
    row.last_status_code, row.last_error = status_code, error
    row.log = [
        *row.log,
        {"at": at.isoformat(), "status_code": status_code, "error": error, "seconds": round(seconds, 3)},
    ]
    ok = status_code is not None and 200 <= status_code < 300
    if ok:
        row.state, row.delivered_at = "delivered", at
    elif row.attempts >= max_attempts:
        row.state = "failed"
    else:
        row.next_attempt_at = at + timedelta(seconds=backoff(row.attempts, base, cap))
    return row.state


@dataclass(frozen=True)
class Outgoing:
    """What one POST needs of a delivery row (plain values: the POST runs outside any session)."""

    event_id: str
    job_id: str
    status: str
    body: bytes

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> Outgoing:
        body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
        return cls(delivery.event_id, delivery.job_id, delivery.status, body)


def post(
    client: Any, outgoing: Outgoing, url: str, secret: str, allowed_hosts: list[str]
) -> tuple[int | None, str | None]:
    """POST one delivery (httpx client); returns (status code or None, error or None)."""
    import httpx

    why = resolved_ok(url, allowed_hosts)
    if why is not None:
        return None, why
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, outgoing.body, int(time.time())),
        EVENT_HEADER: outgoing.event_id,
        "User-Agent": "tvkd-webhooks",
    }
    try:
        response = client.post(url, content=outgoing.body, headers=headers)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return response.status_code, error
