"""jobs.resends: how many times the reconciler re-sent the job's current stage

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 16:30:00

The reconciler re-sends a stage whose worker died or whose message was lost at most
TVKD_MAX_RESENDS times, then fails the job `retries_exhausted` (service.jobstate). Existing jobs
start at 0; the count goes back to 0 whenever a job moves on to its next stage.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resends", sa.Integer(), nullable=True))
    op.execute("UPDATE jobs SET resends = 0")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("resends", existing_type=sa.Integer(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("resends")
