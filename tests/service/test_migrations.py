"""Alembic migrations on both backends: upgrade → downgrade → upgrade on an empty database, and
`alembic check` in spirit: after upgrading, autogenerate finds no difference between the
migrations and the SQLAlchemy models (a model change without its migration fails here)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _insert_job_0001(url: str, hyperparameters: dict[str, Any]) -> None:
    """A job row as revision 0001 stored it (alpha, beta and hyperparameters columns)."""
    engine = make_engine(url)
    now = sa.func.now()
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, name, key_hash, prefix, created_at) "
                    "VALUES ('key_1', 'k', 'h', 'p', :now)"
                ),
                {"now": "2026-11-30 12:00:00"},
            )
            jobs = sa.table(
                "jobs",
                *(sa.column(c) for c in ("id", "owner_id", "status", "stage", "teacher", "student")),
                *(sa.column(c) for c in ("dataset", "spec_hash", "progress_done", "progress_total")),
                *(sa.column(c) for c in ("cancel_requested", "attempts", "created_at", "updated_at")),
                sa.column("alpha", sa.Float),
                sa.column("beta", sa.Float),
                sa.column("hyperparameters", sa.JSON),
                sa.column("result", sa.JSON),
                sa.column("metadata", sa.JSON),
            )
            conn.execute(
                jobs.insert().values(
                    id="job_1", owner_id="key_1", status="queued", stage="train", teacher="t", student="s",
                    dataset="d", spec_hash="x", progress_done=0, progress_total=0, cancel_requested=False,
                    attempts=0, created_at=now, updated_at=now, alpha=0.5, beta=0.2,
                    hyperparameters=hyperparameters, result={}, metadata={},
                )
            )  # fmt: skip
    finally:
        engine.dispose()


# The hyperparameters of the API as of revision 0002 (the method fields but alpha/beta, the
# training fields and the job options of that time).
OPTIONS_THEN = ("eval_dataset", "limit", "on_error", "precompute_bf16")
THEN = frozenset(
    {"value_beta", "gamma", "terminal", "q_source", "shaping", "length_normalize", *OPTIONS_THEN}
    | {"epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "weight_decay", "adam_beta1"}
    | {"adam_beta2", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "max_length", "bf16", "seed"}
    | {"save_every", "keep_checkpoints", "eval_every", "eval_fraction", "num_samples", "log_every"}
    | {"lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "gradient_checkpointing"}
)


def test_0003_moves_the_settings_into_one_spec_and_back(empty_url: str) -> None:
    from service.hyperparams import Hyperparameters
    from tvkd.config import JobSpec, split_settings

    # What 0002's API stored: the hyperparameters of that time (settings added since then, such as
    # report_to, sft_weight or teacher_reference, were not there; they load with their defaults).
    hp = {
        k: v for k, v in Hyperparameters(gamma=0.9, batch_size=3, limit=7).model_dump().items() if k in THEN
    }
    upgrade(empty_url, "0001")
    _insert_job_0001(empty_url, hp)
    upgrade(empty_url, "0003")
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            (spec,) = conn.execute(sa.text("SELECT spec FROM jobs WHERE id = 'job_1'")).one()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    finally:
        engine.dispose()
    spec = spec if isinstance(spec, dict) else json.loads(spec)
    train, options = split_settings({**hp, "alpha": 0.5, "beta": 0.2})
    assert set(spec) == {"train", "options"} and set(spec["options"]) == set(OPTIONS_THEN)
    loaded = JobSpec.from_dict({**spec, "teacher": "t", "student": "s", "dataset": "d", "output_dir": "o",
                                "store_root": "r"})  # fmt: skip
    # The converted row loads as the same settings the API validated (newer fields at defaults).
    assert loaded.train.to_dict() == train.to_dict()
    assert dataclasses.asdict(loaded.options) == dataclasses.asdict(options)
    assert (loaded.train.method.alpha, loaded.train.method.gamma, loaded.options.limit) == (0.5, 0.9, 7)
    assert not {"alpha", "beta", "hyperparameters"} & columns
    downgrade(empty_url, "0002")
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT alpha, beta, hyperparameters FROM jobs")).one()
    finally:
        engine.dispose()
    back = row.hyperparameters if isinstance(row.hyperparameters, dict) else json.loads(row.hyperparameters)
    assert (row.alpha, row.beta, back) == (0.5, 0.2, hp)
