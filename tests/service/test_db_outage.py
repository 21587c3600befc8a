"""The database going away under a running API (issue 10, fault 2): a real `tvkd serve` process
talks to the real PostgreSQL through a TCP proxy that the test stops (connections cut, new ones
refused) and starts again. While it is down every request that needs the database answers 503
with Retry-After and the one error body, never a 500; /readyz says not ready without naming the
host; when it is back the same process answers again (pool pre-ping replaces dead connections).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ALICE, BOB, PG_URL, client, free_port, start_process, wait_for
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from service.migrate import upgrade
from service.scratch import postgres_schema

ERROR_FIELDS = {"code", "message", "field", "details"}
CREATE = {"teacher": "teacher", "student": "student", "dataset": "pairs.jsonl"}


@pytest.fixture
def proxied_api(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, TcpProxy]]:
    """An API process whose PostgreSQL (a scratch schema) is reached through a TcpProxy."""
    with postgres_schema(PG_URL) as url:
        upgrade(url)
        pg = make_url(PG_URL)
        with TcpProxy((pg.host or "127.0.0.1", pg.port or 5432)) as proxy:
            proxied = url.replace(f"@{pg.host}:{pg.port}/", f"@127.0.0.1:{proxy.port}/")
            assert proxied != url
            env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
            env.update(
                TVKD_HOME=str(tmp_path),
                TVKD_DATABASE_URL=proxied,
                TVKD_BROKER_URL=redis_url,
                TVKD_API_KEYS=f"alice={ALICE},bob={BOB}",
                PYTHONUNBUFFERED="1",
            )
            port = free_port()
            proc = start_process("api", ["serve", "--port", str(port)], env, tmp_path)
            base = f"http://127.0.0.1:{port}"
            proc.wait_answering(f"{base}/readyz")
            try:
                yield base, proxy
            finally:
                proc.stop()


def assert_unavailable(response: httpx.Response, proxy: TcpProxy) -> dict:
    assert response.status_code == 503, (response.request.url, response.status_code, response.text)
    assert int(response.headers["Retry-After"]) > 0
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    text = json.dumps(body)
    for host_detail in ("127.0.0.1", str(proxy.port), "5432", "psycopg", "root@"):
        assert host_detail not in text, (host_detail, body)
    return body["error"]


def test_api_answers_503_while_the_database_is_unreachable_then_recovers(
    proxied_api: tuple[str, TcpProxy],
) -> None:
    base, proxy = proxied_api
    job_id = "job_" + "0" * 24
    with client(base, ALICE) as alice, client(base, BOB) as bob:
        assert alice.get("/v1/jobs").status_code == 200  # alice's key is now in the API's cache
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 404

        proxy.stop()
        requests = [
            (alice, "GET", "/v1/jobs", {}),  # cached key: the route's own query fails
            (alice, "GET", f"/v1/jobs/{job_id}", {}),
            (alice, "GET", f"/v1/jobs/{job_id}/events", {}),
            (alice, "GET", "/v1/precomputes", {}),
            (alice, "GET", "/v1/datasets", {}),
            (alice, "POST", f"/v1/jobs/{job_id}/cancel", {}),
            (alice, "POST", "/v1/jobs", {"json": CREATE, "headers": {"Idempotency-Key": "k1"}}),
            (bob, "GET", "/v1/jobs", {}),  # a key not cached: the key lookup itself fails
        ]
        for http, method, path, kw in requests:
            error = assert_unavailable(http.request(method, path, **kw), proxy)
            assert error["code"] == "service_unavailable", error
        ready = httpx.get(f"{base}/readyz", timeout=30)
        error = assert_unavailable(ready, proxy)
        assert error["code"] == "not_ready"
        checks = {d["check"]: d["status"] for d in error["details"]}
        assert checks["database"] == "unreachable" and checks["broker"] == "ok", checks

        proxy.start()  # the same port: the API's URL is unchanged
        wait_for(lambda: bob.get("/v1/jobs").status_code == 200, timeout=30, what="the API to answer again")
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 404
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
