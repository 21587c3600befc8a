"""`tvkd serve`: the REST API (FastAPI under uvicorn).

Upgrades the database to the newest migration first (unless `--no-migrate`), then serves
`service.app:create_app` with settings from the environment (TVKD_*, `.env`). Needs the
`service` extra: `pip install 'tvkd[service]'`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tvkd.cli.up import port_number, positive_int

SERVICE_EXTRA_HINT = "the API needs the service extra: pip install 'tvkd[service]'"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the REST API (uvicorn)",
        description="Run the TVKD REST API. Settings come from TVKD_* environment variables (and .env).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="uvicorn worker processes (default: 1)"
    )
    parser.add_argument(
        "--no-migrate", action="store_true", help="do not upgrade the database to the newest migration first"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    parser.set_defaults(func=run)


def migrate(url: str) -> None:
    """Alembic upgrade to head. On PostgreSQL under an advisory lock, so that several API
    processes starting at once do not race to create the same tables."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from service.db import make_engine
    from service.migrate import upgrade

    if not make_url(url).drivername.startswith("postgres"):
        upgrade(url)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(hashtext('tvkd-migrate'))"))
            try:
                upgrade(url)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext('tvkd-migrate'))"))
                conn.commit()
    finally:
        engine.dispose()


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn

        from service.settings import Settings
    except ImportError as exc:
        print(f"tvkd serve: {SERVICE_EXTRA_HINT} ({exc.name} is missing)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from service.auth import KeyConfigError, bootstrap_entries, server_secret

    settings = Settings()
    try:
        bootstrap_entries(settings.api_keys)
        server_secret(settings)
    except KeyConfigError as exc:
        print(f"tvkd serve: {exc}", file=sys.stderr)
        return 2
    if not args.no_migrate:
        try:
            migrate(settings.resolved_database_url)
        except Exception as exc:
            print(f"tvkd serve: cannot migrate the database: {exc}", file=sys.stderr)
            return 1
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )
    return 0
