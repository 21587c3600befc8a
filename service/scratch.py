"""Throw-away isolation on shared servers, for test runs and benchmarks: a PostgreSQL schema of
one's own, and a Redis database number of one's own, each cleaned up on exit. Runs on the same
servers (developers' sessions and CI share them) can then never see each other's rows or queues.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

CLAIM_KEY = "tvkd:test-db-claim:{}"  # in Redis db 0: which run holds database number N


@contextmanager
def postgres_schema(admin_url: str, prefix: str = "tvkd_t") -> Iterator[str]:
    """Create `<prefix>_<random>`, yield a URL whose search_path is that schema, drop it after."""
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url)
    schema = f"{prefix}_{secrets.token_hex(6)}"
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        yield f"{admin_url}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@contextmanager
def redis_database(
    host: str = "127.0.0.1",
    port: int = 6379,
    *,
    lease_seconds: int = 30,
    wait_seconds: float = 120.0,
) -> Iterator[int]:
    """Claim a free database number 1..15 and yield it; flushed before and after use.

    The claim is a key in db 0 (SET NX) with a short expiry (`lease_seconds`) that a daemon thread
    renews every third of it while the run holds the number. A run that is killed (SIGKILL, a
    stopped CI job) therefore frees its number within `lease_seconds`, instead of blocking every
    later run for hours. When all 15 are held, waits up to `wait_seconds` for one to free up, then
    raises RuntimeError naming the holders' tokens.
    """
    import redis

    admin = redis.Redis(host=host, port=port, db=0)
    admin.ping()  # a clear ConnectionError when Redis is not running
    token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    deadline = time.monotonic() + wait_seconds
    number = 0
    while not number:
        for candidate in range(1, 16):
            if admin.set(CLAIM_KEY.format(candidate), token, nx=True, ex=lease_seconds):
                number = candidate
                break
        else:
            if time.monotonic() >= deadline:
                holders = [admin.get(CLAIM_KEY.format(n)) for n in range(1, 16)]
                raise RuntimeError(
                    f"all Redis databases 1..15 are claimed by other runs after waiting "
                    f"{wait_seconds:.0f} s (holders: {[h.decode() for h in holders if h]})"
                )
            time.sleep(1.0)
    key = CLAIM_KEY.format(number)
    stop = threading.Event()

    def renew() -> None:
        # Extend the claim only while it is still ours (a compare-and-expire in one script).
        script = admin.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
        )
        while not stop.wait(lease_seconds / 3):
            # A blink of Redis: try again at the next tick; the lease outlives one miss.
            with contextlib.suppress(redis.RedisError):
                script(keys=[key], args=[token, lease_seconds])

    renewer = threading.Thread(target=renew, name=f"redis-claim-{number}", daemon=True)
    renewer.start()
    db = redis.Redis(host=host, port=port, db=number)
    db.flushdb()
    try:
        yield number
    finally:
        stop.set()
        renewer.join(timeout=5)
        db.flushdb()
        if admin.get(key) == token.encode():
            admin.delete(key)
