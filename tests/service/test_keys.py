"""API keys (issue 10, fault 4), with real `tvkd keys` and `tvkd serve` processes on SQLite and
PostgreSQL: keys are shown once and stored as HMAC digests with nothing of the key in clear; a
revoked key is refused; short bootstrap keys and placeholder secrets stop the API from starting;
the generated secret is private and kept; keys stored as sha256 before the migration keep
working (and their jobs) and are re-hashed on first use."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import ALICE, PG_URL, REPO, SECRET, client, free_port, start_process, wait_for

from service.auth import CACHE_SECONDS, hash_key
from service.db import make_engine
from service.migrate import upgrade
from service.scratch import postgres_schema


def tvkd(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tvkd.cli", *args], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def key_rows(url: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM api_keys"))]
    finally:
        engine.dispose()


def assert_nothing_of_the_key_stored(url: str, key: str) -> None:
    """No column of any key row holds the key, a piece of its secret part (8 characters from any
    position), or its unkeyed sha256."""
    secret_part = key.removeprefix("sk-")
    pieces = {secret_part[i : i + 8] for i in range(len(secret_part) - 7)}
    for row in key_rows(url):
        for column, value in row.items():
            text = str(value)
            assert key not in text and hashlib.sha256(key.encode()).hexdigest() not in text, column
            leaked = [p for p in pieces if p in text]
            assert not leaked, (column, leaked)


def base_env(home: Path, database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    env.update(TVKD_HOME=str(home), PYTHONUNBUFFERED="1")
    if database_url:
        env["TVKD_DATABASE_URL"] = database_url
    return env


def test_keys_are_created_once_listed_and_revoked(
    api: str, service_env: dict[str, str], database_url: str
) -> None:
    made = tvkd(service_env, "keys", "create", "--name", "ci")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert len(key) >= 40 and "\n" not in key
    found = re.search(r"created (key_[0-9a-f]+) \(ci\)", made.stderr)
    assert found and "shown this once" in made.stderr, made.stderr
    key_id = found.group(1)
    with client(api, key) as http:
        assert http.get("/v1/jobs").status_code == 200  # now in the API's key cache
        listed = tvkd(service_env, "keys", "list")
        assert listed.returncode == 0, listed.stderr
        line = next(x for x in listed.stdout.splitlines() if x.startswith(key_id))
        assert "ci" in line and "hmac-sha256" in line and key not in listed.stdout
        assert_nothing_of_the_key_stored(database_url, key)
        assert_nothing_of_the_key_stored(database_url, ALICE)  # a bootstrapped key neither

        revoked = tvkd(service_env, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        wait_for(
            lambda: http.get("/v1/jobs").status_code == 401,
            timeout=CACHE_SECONDS + 15,
            what="the revoked key to be refused",
        )
        assert time.monotonic() - started <= CACHE_SECONDS + 15
    assert key_id not in tvkd(service_env, "keys", "list").stdout
    assert key_id in tvkd(service_env, "keys", "list", "--all").stdout
    missing = tvkd(service_env, "keys", "revoke", "key_000000000000000000000000")
    assert missing.returncode == 1 and "no API key" in missing.stderr


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("TVKD_API_KEYS", "ops=sk-short-key", "TVKD_API_KEYS entry 1 (ops) is 12 characters long"),
        ("TVKD_API_KEYS", f"a={ALICE},sk-0123456789", "TVKD_API_KEYS entry 2 (bootstrap)"),
        ("TVKD_SECRET_KEY", "changethis", "TVKD_SECRET_KEY is a placeholder"),
        ("TVKD_SECRET_KEY", "x7Gq2-too-short", "TVKD_SECRET_KEY is too short"),
    ],
)
def test_unusable_key_settings_stop_the_api(tmp_path: Path, setting: str, value: str, says: str) -> None:
    env = {**base_env(tmp_path), setting: value}
    served = tvkd(env, "serve", "--port", str(free_port()), timeout=60)
    assert served.returncode == 2, served.stderr
    assert says in served.stderr, served.stderr
    assert "sk-short-key" not in served.stderr and "sk-0123456789" not in served.stderr
    if setting == "TVKD_SECRET_KEY":
        assert tvkd(env, "keys", "list").returncode == 2  # the key tool refuses the same secret


def test_generated_secret_is_private_kept_and_shared_with_the_key_tool(tmp_path: Path) -> None:
    env = base_env(tmp_path)  # no TVKD_SECRET_KEY: the embedded default generates one
    first = tvkd(env, "keys", "create", "--name", "one")
    assert first.returncode == 0, first.stderr
    secret_file = tmp_path / "secret_key"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_bytes()
    assert len(secret.strip()) >= 32
    second = tvkd(env, "keys", "create", "--name", "two")
    assert secret_file.read_bytes() == secret  # made once, then kept
    port = free_port()
    proc = start_process("api", ["serve", "--port", str(port)], env, tmp_path)
    try:
        proc.wait_answering(f"http://127.0.0.1:{port}/readyz")
        for made in (first, second):
            with client(f"http://127.0.0.1:{port}", made.stdout.strip()) as http:
                assert http.get("/v1/jobs").status_code == 200
        assert secret_file.read_bytes() == secret
    finally:
        proc.stop()


@pytest.fixture
def legacy_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database at revision 0001 (keys as unkeyed sha256 with an 8-character prefix in clear)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'legacy.db'}"
        upgrade(url, "0001")
        yield url
        return
    with postgres_schema(PG_URL, prefix="tvkd_k") as url:
        upgrade(url, "0001")
        yield url


def test_legacy_sha256_keys_keep_working_and_are_rehashed(
    legacy_database: str, tmp_path: Path, redis_url: str
) -> None:
    url = legacy_database
    key = "sk-legacy-" + os.urandom(16).hex()
    now = "2026-01-01 00:00:00"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, name, key_hash, prefix, created_at) VALUES "
                "('key_legacy', :name, :digest, :prefix, :now)"
            ),
            {"name": f"key-{key[:8]}", "digest": hashlib.sha256(key.encode()).hexdigest(),
             "prefix": key[:8], "now": now},
        )  # fmt: skip
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, owner_id, status, stage, teacher, student, dataset, alpha, beta, "
                "hyperparameters, metadata, spec_hash, progress_done, progress_total, cancel_requested, "
                "attempts, result, created_at, updated_at) VALUES ('job_0123456789abcdef01234567', "
                "'key_legacy', 'cancelled', 'validate', 't', 's', 'd', 0.5, 0.1, '{}', '{}', 'h', 0, 0, "
                ":no, 0, '{}', :now, :now)"
            ),
            {"no": False, "now": now},
        )
    engine.dispose()

    upgrade(url)
    [row] = key_rows(url)
    assert "prefix" not in row and row["name"] == "bootstrap" and row["hash_scheme"] == "sha256"

    env = {**base_env(tmp_path, url), "TVKD_BROKER_URL": redis_url, "TVKD_SECRET_KEY": SECRET}
    port = free_port()
    proc = start_process("api", ["serve", "--port", str(port)], env, tmp_path)
    try:
        proc.wait_answering(f"http://127.0.0.1:{port}/readyz")
        with client(f"http://127.0.0.1:{port}", key) as http:
            jobs = http.get("/v1/jobs")
            assert jobs.status_code == 200, jobs.text
            assert [j["id"] for j in jobs.json()["data"]] == ["job_0123456789abcdef01234567"]
        [row] = key_rows(url)
        assert (row["id"], row["hash_scheme"]) == ("key_legacy", "hmac-sha256")
        assert row["key_hash"] == hash_key(key, SECRET.encode())
        assert_nothing_of_the_key_stored(url, key)
        with client(f"http://127.0.0.1:{port}", key) as http:  # and it keeps working as HMAC
            assert http.get("/v1/jobs/job_0123456789abcdef01234567").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs").status_code == 401
    finally:
        proc.stop()
