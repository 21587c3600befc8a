"""Engine and sessions. One engine per process, made from the settings' database URL.

SQLite (the embedded default) is shared by the API and worker processes: WAL mode lets readers
run beside one writer, and a busy timeout makes a second writer wait instead of failing.
PostgreSQL connections are checked before use (pool pre-ping: a connection the server or the
network dropped is replaced instead of failing a request) and give up connecting after
CONNECT_TIMEOUT seconds, so an unreachable server is an error, not a hang.

`is_transient(exc)` tells a database error that may succeed when retried (the server is
unreachable or restarting, a connection was reset, a serialization failure or deadlock) from one
that will not (a constraint, a bad query): the API answers the first with 503 and Retry-After;
the workers retry it (`retrying`, `in_transaction`: exponential backoff with jitter, up to
RETRY_SECONDS), so a database that blinks does not fail a job.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("tvkd.db")
T = TypeVar("T")

CONNECT_TIMEOUT = 5  # seconds a new PostgreSQL connection may take
# SQLSTATEs worth a retry: connection exceptions (class 08), the server shutting down or starting
# (57P01-57P03), too many connections (53300), serialization failure and deadlock (40001, 40P01).
TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01"})
# sqlite3 errors that pass: another writer holds the lock past the busy timeout, the file is
# briefly unavailable.
TRANSIENT_SQLITE = ("database is locked", "database table is locked", "unable to open database file",
                    "disk i/o error")  # fmt: skip


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL: a power cut may lose the last commits but never corrupts the file, and
            # commits stop waiting for fsync (measured: create p99 201 → 52 ms under load).
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if parsed.drivername in ("postgresql", "postgres"):
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    connect_args = {"connect_timeout": CONNECT_TIMEOUT} if parsed.drivername.startswith("postgres") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


def is_transient(exc: BaseException) -> bool:
    """True for a database error that a retry after a pause may cure: the server unreachable,
    restarting or out of connections, a connection reset or terminated by an administrator, a
    serialization failure or deadlock, SQLite's lock held past the busy timeout, the pool's own
    timeout. False for errors of the request or the schema (constraints, syntax, missing table)."""
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    sqlstate = getattr(exc, "sqlstate", None)  # psycopg 3
    if isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in TRANSIENT_SQLSTATES):
        return True
    module = type(exc).__module__
    if module.startswith("psycopg"):
        # Failures to connect or of the connection itself carry no SQLSTATE.
        import psycopg

        return isinstance(exc, psycopg.OperationalError) and sqlstate is None
    if module == "sqlite3":
        import sqlite3

        text = str(exc).lower()
        return isinstance(exc, sqlite3.OperationalError) and any(t in text for t in TRANSIENT_SQLITE)
    return False


# The workers' retry of a transient error: first pause 0.2 s, doubling up to 5 s, for at most
# RETRY_SECONDS in all (longer than a database restart or a failover; shorter than a lease).
RETRY_FIRST, RETRY_MAX, RETRY_SECONDS = 0.2, 5.0, 60.0


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    seconds: float = RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, called again after a pause while it raises a transient database error
    (`is_transient`), for up to `seconds`; then (or at once for any other error) the error is
    raised. Pauses: RETRY_FIRST doubling to RETRY_MAX, each with ±25 % jitter. `fn` must be safe
    to repeat (a whole transaction: it either committed or rolled back; writes keyed by a lease
    token or a unique key)."""
    deadline = time.monotonic() + seconds
    pause = RETRY_FIRST
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc) or left <= 0:
                raise
            wait = min(pause * random.uniform(0.75, 1.25), left)
            log.warning("%s: transient database error (%s), attempt %d; retrying in %.1f s",
                        what, type(exc).__name__, attempt, wait)  # fmt: skip
            sleep(wait)
            pause, attempt = min(pause * 2, RETRY_MAX), attempt + 1


def in_transaction(
    factory: sessionmaker[Session], fn: Callable[[Session], T], *, what: str, seconds: float = RETRY_SECONDS
) -> T:
    """`fn(session)` in a transaction that commits on success, the whole transaction retried on a
    transient database error (see `retrying`)."""

    def once() -> T:
        with transaction(factory) as session:
            return fn(session)

    return retrying(once, what=what, seconds=seconds)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


_factories: dict[str, sessionmaker[Session]] = {}
_factories_lock = threading.Lock()


def cached_sessions(url: str) -> sessionmaker[Session]:
    """One engine (connection pool) per database URL per process, for code that has no app state
    to keep one in (the workers, the reconciler, a publish that reports a broker outage)."""
    with _factories_lock:
        factory = _factories.get(url)
        if factory is None:
            factory = _factories[url] = session_factory(make_engine(url))
        return factory
