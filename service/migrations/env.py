"""Alembic environment: the URL comes from the caller (service.migrate), never from a file."""

from __future__ import annotations

from alembic import context

from service.db import make_engine
from service.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "service.migrate sets sqlalchemy.url"


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode rebuilds a table by copy, drop and rename: with foreign keys enforced the
            # drop of a referenced table (api_keys, jobs) fails. Off for the migration only (the
            # pragma must be set outside a transaction, so before Alembic opens one).
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
