"""stage names say what runs: `reference` is a step inside `train`, no longer a job stage

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 14:00:00

A job waiting at (or running) the old `reference` stage moves to `train`, which ran it anyway:
the train task computes the reference log-probs in its setup and reuses them on resume. The
downgrade has nothing to undo (`train` was a stage before too).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    jobs = sa.table("jobs", sa.column("stage", sa.String))
    op.execute(jobs.update().where(jobs.c.stage == "reference").values(stage="train"))


def downgrade() -> None:
    pass
