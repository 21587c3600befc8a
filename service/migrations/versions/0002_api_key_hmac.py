"""API keys: HMAC-SHA256 with the server secret; no prefix of the key in clear

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00

- `hash_scheme` says how `key_hash` was made: "sha256" for the rows already stored (an unkeyed
  digest; service.auth re-hashes such a row with the server secret the first time its key is
  used), "hmac-sha256" for every key stored from now on.
- `prefix` (the key's first 8 characters, in clear) is dropped, and the name that bootstrapping
  gave a bare key (`key-<its first 8 characters>`) becomes "bootstrap".

Downgrade puts back an empty `prefix`; keys stored as HMAC then no longer authenticate with the
old code (it only knows sha256): they fail closed, and `tvkd keys create` makes new ones.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hash_scheme", sa.String(length=16), nullable=True))
    op.execute("UPDATE api_keys SET hash_scheme = 'sha256'")
    op.execute("UPDATE api_keys SET name = 'bootstrap' WHERE name = 'key-' || prefix")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.alter_column("hash_scheme", existing_type=sa.String(length=16), nullable=False)
        batch_op.drop_column("prefix")


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prefix", sa.String(length=12), nullable=True))
    op.execute("UPDATE api_keys SET prefix = ''")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.alter_column("prefix", existing_type=sa.String(length=12), nullable=False)
        batch_op.drop_column("hash_scheme")
