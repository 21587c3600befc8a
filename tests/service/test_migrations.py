"""Alembic migrations on both backends: upgrade → downgrade → upgrade on an empty database, and
`alembic check` in spirit: after upgrading, autogenerate finds no difference between the
migrations and the SQLAlchemy models (a model change without its migration fails here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import PG_URL

from service.db import make_engine
from service.migrate import alembic_config, downgrade, upgrade
from service.models import Base
from service.scratch import postgres_schema


@pytest.fixture
def empty_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database of our own with no tables: a SQLite file, or a fresh PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    with postgres_schema(PG_URL, prefix="tvkd_m") as url:
        yield url


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(empty_url)).get_current_head()
    model_tables = set(Base.metadata.tables)
    upgrade(empty_url)
    assert _revision(empty_url) == head
    assert model_tables <= _tables(empty_url)
    downgrade(empty_url, "base")
    assert _revision(empty_url) is None
    assert not (model_tables & _tables(empty_url))
    upgrade(empty_url)
    assert _revision(empty_url) == head
    assert model_tables <= _tables(empty_url)
    upgrade(empty_url)  # a second upgrade is a no-op
    assert _revision(empty_url) == head


def test_every_revision_steps_down_and_up(empty_url: str) -> None:
    """Each migration's downgrade undoes exactly its upgrade, one step at a time."""
    script = ScriptDirectory.from_config(alembic_config(empty_url))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    for revision in revisions:
        upgrade(empty_url, revision)
        assert _revision(empty_url) == revision
    for revision in reversed(revisions):
        downgrade(empty_url, "-1")
        assert _revision(empty_url) == script.get_revision(revision).down_revision
    assert _revision(empty_url) is None


def test_models_and_migrations_agree(empty_url: str) -> None:
    upgrade(empty_url)
    engine = make_engine(empty_url)
    # A control: the same comparison does see a column the migrations lack.
    changed = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["jobs"].append_column(sa.Column("not_migrated", sa.Integer, nullable=True))
    opts = {"compare_type": True, "compare_server_default": True}
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts=opts), Base.metadata)
            control = compare_metadata(MigrationContext.configure(conn, opts=opts), changed)
    finally:
        engine.dispose()
    assert diff == [], f"the models differ from the migrations (add a migration): {diff}"
    assert [d[0] for d in control] == ["add_column"], control
