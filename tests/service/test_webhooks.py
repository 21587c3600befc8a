"""Webhooks end to end: a real local HTTP receiver (http.server on loopback), the real API and
workers. Every status change of a job reaches the receiver as a POST signed HMAC-SHA256 over
"t.body" (checked here with hmac directly); a receiver answering 503 gets retried with backoff;
one that is down changes nothing for the job; the delivery log is in the API, owner-only."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import BOB, WorkerPool, client, free_port, wait_for
from test_worker import job_body, wait_status

SECRET = "whsec-" + "k" * 24


class Receiver:
    """Records every POST; answers `fail_first` of them with 503, the rest with 200."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    n = len(receiver.posts)
                    code = 503 if n < receiver.fail_first else 200
                    receiver.posts.append({"headers": dict(self.headers), "body": body, "code": code})
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tvkd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


def deliveries(api: str, job_id: str) -> dict[str, Any]:
    with client(api) as c:
        r = c.get(f"/v1/jobs/{job_id}/webhooks", params={"limit": 100})
    assert r.status_code == 200, r.text
    return r.json()


def signed_by(secret: str, post: dict[str, Any]) -> bool:
    """The Stripe scheme, recomputed here: t=<unix>,v1=hex(HMAC-SHA256(secret, f"{t}.{body}"))."""
    fields = dict(part.split("=", 1) for part in post["headers"]["Tvkd-Signature"].split(","))
    mac = hmac.new(secret.encode(), f"{fields['t']}.".encode() + post["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["v1"]) and abs(time.time() - int(fields["t"])) < 600


def test_each_status_change_is_posted_signed_and_retried(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], receiver: Receiver
) -> None:
    workers.ensure_one()
    body = {
        **job_body(tiny_assets, max_steps=2, save_every=0),
        "webhook": {"url": receiver.url, "secret": SECRET},
    }
    with client(api) as c:
        r = c.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert "secret" not in r.text  # never shown again
    wait_status(api, job_id, {"succeeded"}, timeout=90, pool=workers)

    def all_delivered() -> dict[str, Any] | None:
        log = deliveries(api, job_id)
        return log if log["data"] and all(d["state"] == "delivered" for d in log["data"]) else None

    try:
        log = wait_for(all_delivered, timeout=60, what="every webhook delivered")
    except pytest.fail.Exception:
        print(json.dumps(deliveries(api, job_id), indent=1), "\n".join(p.tail(40) for p in workers.procs))
        raise
    assert log["url"] == receiver.url
    statuses = [d["status"] for d in log["data"]]
    assert statuses[0] == "validating" and statuses[-1] == "succeeded"
    assert {"queued", "precomputing", "training", "evaluating"} <= set(statuses)

    # The receiver's view: every event arrived with a valid signature, the payload the log names.
    ok = [p for p in receiver.posts if p["code"] == 200]
    events = {json.loads(p["body"])["id"]: json.loads(p["body"]) for p in ok}
    assert set(events) == {d["event_id"] for d in log["data"]}
    assert all(signed_by(SECRET, p) for p in receiver.posts)
    assert not signed_by("another-secret-of-16+", receiver.posts[0])
    for p in ok:
        payload = json.loads(p["body"])
        assert p["headers"]["Tvkd-Event-Id"] == payload["id"] and payload["type"] == "job.status_changed"
        assert payload["data"]["job_id"] == job_id
    first = next(d for d in log["data"] if d["status"] == "validating")
    assert events[first["event_id"]]["data"]["previous_status"] is None

    # The first two POSTs got 503: retried after the backoff, each attempt in the log.
    retried = [d for d in log["data"] if d["attempts"] > 1]
    failed_attempts = [a for d in log["data"] for a in d["log"] if a["status_code"] == 503]
    assert len(failed_attempts) == 2 and retried
    for d in retried:
        assert [a["status_code"] for a in d["log"]][-1] == 200 and d["log"][0]["error"] == "HTTP 503"

    with client(api, BOB) as other:
        assert other.get(f"/v1/jobs/{job_id}/webhooks").status_code == 404


def test_a_receiver_that_is_down_changes_nothing_for_the_job(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str]
) -> None:
    workers.ensure_one()
    closed = f"http://127.0.0.1:{free_port()}/nobody-listens"
    body = {**job_body(tiny_assets, max_steps=1, save_every=0), "webhook": {"url": closed, "secret": SECRET}}
    with client(api) as c:
        job_id = c.post("/v1/jobs", json=body).json()["id"]
    job = wait_status(api, job_id, {"succeeded"}, timeout=90, pool=workers)
    assert job["error"] is None
    log = wait_for(
        lambda: (lg := deliveries(api, job_id)) and all(d["attempts"] >= 1 for d in lg["data"]) and lg,
        timeout=30,
        what="an attempt at every delivery",
    )
    assert {d["state"] for d in log["data"]} <= {"pending", "failed"}
    attempt = log["data"][0]["log"][0]
    assert attempt["status_code"] is None and "ConnectError" in attempt["error"]


def test_webhook_urls_and_secrets_are_checked_at_submit(api: str, tiny_assets: dict[str, str]) -> None:
    base = job_body(tiny_assets)
    with client(api) as c:
        for webhook, field in (
            ({"url": "http://example.com/hook", "secret": SECRET}, "webhook.url"),
            ({"url": "ftp://127.0.0.1/hook", "secret": SECRET}, "webhook.url"),
            ({"url": "http://user:pw@127.0.0.1/hook", "secret": SECRET}, "webhook.url"),
            ({"url": "http://127.0.0.1:9/hook"}, "webhook.secret"),  # and the server has none
        ):
            r = c.post("/v1/jobs", json={**base, "webhook": webhook})
            assert r.status_code == 422, webhook
            assert r.json()["error"]["field"] == field, r.text
