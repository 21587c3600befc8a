"""one job spec: jobs.spec holds the validated settings whole (replaces alpha, beta, hyperparameters)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 12:00:00

`spec` is {"train": TrainConfig as a nested dict (its `method` holds alpha and beta),
"options": JobOptions}. Existing rows are converted; the downgrade converts back.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The names as of this revision (later config changes must not change what this migration does).
METHOD = ("alpha", "beta", "value_beta", "gamma", "terminal", "q_source", "shaping", "length_normalize")
OPTIONS = ("eval_dataset", "limit", "on_error", "precompute_bf16")
OPTION_DEFAULTS: dict[str, Any] = {
    "eval_dataset": None,
    "limit": None,
    "on_error": "drop",
    "precompute_bf16": False,
}


def _jobs(*columns: sa.Column[Any]) -> sa.TableClause:
    return sa.table("jobs", sa.column("id", sa.String), *columns)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("spec", sa.JSON(), nullable=True))
    old = _jobs(
        sa.column("alpha", sa.Float),
        sa.column("beta", sa.Float),
        sa.column("hyperparameters", sa.JSON),
        sa.column("spec", sa.JSON),
    )
    bind = op.get_bind()
    for row in bind.execute(sa.select(old.c.id, old.c.alpha, old.c.beta, old.c.hyperparameters)).all():
        hp = dict(row.hyperparameters or {})
        method = {"alpha": row.alpha, "beta": row.beta, **{k: hp.pop(k) for k in METHOD[2:] if k in hp}}
        options = {k: hp.pop(k, OPTION_DEFAULTS[k]) for k in OPTIONS}
        spec = {"train": {"method": method, **hp}, "options": options}
        bind.execute(old.update().where(old.c.id == row.id).values(spec=spec))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("spec", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("hyperparameters")
        batch.drop_column("beta")
        batch.drop_column("alpha")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("alpha", sa.Float(), nullable=True))
        batch.add_column(sa.Column("beta", sa.Float(), nullable=True))
        batch.add_column(sa.Column("hyperparameters", sa.JSON(), nullable=True))
    new = _jobs(
        sa.column("alpha", sa.Float),
        sa.column("beta", sa.Float),
        sa.column("hyperparameters", sa.JSON),
        sa.column("spec", sa.JSON),
    )
    bind = op.get_bind()
    for row in bind.execute(sa.select(new.c.id, new.c.spec)).all():
        train = dict(row.spec["train"])
        method = dict(train.pop("method"))
        alpha, beta = method.pop("alpha"), method.pop("beta")
        hp = {**method, **train, **row.spec["options"]}
        bind.execute(
            new.update().where(new.c.id == row.id).values(alpha=alpha, beta=beta, hyperparameters=hp)
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("alpha", existing_type=sa.Float(), nullable=False)
        batch.alter_column("beta", existing_type=sa.Float(), nullable=False)
        batch.alter_column("hyperparameters", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("spec")
