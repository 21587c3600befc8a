"""/healthz (the process answers) and /readyz (it can do its work: the database is reachable and
migrated to the head revision, the broker is reachable). No auth: these are for probes, so the
answer says which check fails but never why in the driver's words (those name hosts, ports and
users): the API log has that."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.errors import RETRY_AFTER_SECONDS, APIError
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
        logger.warning("readyz: the database is unreachable: %s", str(exc).splitlines()[0][:500])
        return "unreachable", "unknown"
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
            if broker.parent.is_dir():
                return "ok"
            logger.warning("readyz: the embedded broker's folder %s is missing", broker.parent)
            return "embedded broker folder is missing"
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
        logger.warning("readyz: the broker is unreachable: %s: %s", type(exc).__name__, str(exc)[:500])
        return "unreachable"


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
        raise APIError(
            503, "not_ready", message, details=details, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )
    return Readiness(status="ready", checks=checks)
