"""/healthz (the process answers) and /readyz (it can do its work: the database is reachable and
migrated to the head revision, the broker is reachable). No auth: these are for probes."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.errors import APIError
from service.schemas import Health, Readiness, error_responses
from service.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

PROBE_TIMEOUT = 2.0


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from service.migrate import alembic_config

    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    return ",".join(sorted(heads))


def check_database(request: Request) -> tuple[str, str]:
    """(database, migrations) check results."""
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            except SQLAlchemyError:
                return "ok", "not migrated: no alembic_version table (run `tvkd serve` or alembic upgrade)"
    except SQLAlchemyError as exc:
        return f"unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "unknown"
    current = ",".join(sorted(rows))
    head = request.app.state.head_revision
    if current != head:
        return "ok", f"at revision {current or 'none'}, head is {head}"
    return "ok", "ok"


def check_broker(settings: Settings) -> str:
    url = settings.broker_url
    try:
        if not url:
            broker = Path(settings.embedded_broker_dir)
            return "ok" if broker.parent.is_dir() else f"embedded broker folder {broker.parent} is missing"
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(
                url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
            )
            try:
                client.ping()
            finally:
                client.close()
            return "ok"
        from kombu import Connection

        with Connection(url, connect_timeout=PROBE_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1)
        return "ok"
    except Exception as exc:  # any client error means "not reachable"
        return f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Database reachable and migrated, broker reachable",
    responses=error_responses(503),
)
def readyz(request: Request) -> Readiness:
    database, migrations = check_database(request)
    broker = check_broker(request.app.state.settings)
    checks = {"database": database, "migrations": migrations, "broker": broker}
    failing = {name: status for name, status in checks.items() if status != "ok"}
    if failing:
        logger.warning("not ready: %s", failing)
        message = "; ".join(f"{name}: {status}" for name, status in failing.items())
        details = [{"check": name, "status": status} for name, status in checks.items()]
        raise APIError(503, "not_ready", message, details=details)
    return Readiness(status="ready", checks=checks)
