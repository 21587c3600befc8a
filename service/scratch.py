"""Throw-away isolation on shared servers, for test runs and benchmarks: a PostgreSQL schema of
one's own, and a Redis database number of one's own, each cleaned up on exit. Runs on the same
servers (developers' sessions and CI share them) can then never see each other's rows or queues.
"""

from __future__ import annotations

import os
import secrets
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
    host: str = "127.0.0.1", port: int = 6379, *, hold_seconds: int = 3 * 3600
) -> Iterator[int]:
    """Claim a free database number 1..15 (SET NX with an expiry in db 0), flushed before and
    after use. Raises RuntimeError when every number is claimed."""
    import redis

    admin = redis.Redis(host=host, port=port, db=0)
    admin.ping()  # a clear ConnectionError when Redis is not running
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    for number in range(1, 16):
        if admin.set(CLAIM_KEY.format(number), token, nx=True, ex=hold_seconds):
            break
    else:
        raise RuntimeError("all Redis databases 1..15 are claimed by other runs")
    db = redis.Redis(host=host, port=port, db=number)
    db.flushdb()
    try:
        yield number
    finally:
        db.flushdb()
        if admin.get(CLAIM_KEY.format(number)) == token.encode():
            admin.delete(CLAIM_KEY.format(number))
