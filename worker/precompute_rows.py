"""The shared teacher value store's `Precompute` row, which the precompute stage writes beside its
job's: upserted by content key when a job starts computing (or finding) the store, `failed` when
the computation failed before the store was complete, `complete` with the job that computed it.
The job's own row is written through service/jobstate/ only.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db import transaction
from service.models import Precompute, utcnow
from tvkd.store import ValueStore
from worker.reporting import _jsonable, upsert

RECORDER_WAIT_SECONDS = 5.0


def started(
    factory: sessionmaker[Session], key: str, *, teacher: str | None, path: str, fields: dict[str, Any]
) -> None:
    """The store of `key` is being computed (or found): its row exists, `running` when new."""
    row = {"key": key, "status": "running", "teacher": teacher, "path": path, "fields": _jsonable(fields)}
    with transaction(factory) as session:
        upsert(session, Precompute, [row], keys=("key",), update_cols=())


def failed(factory: sessionmaker[Session], key: str) -> None:
    """The computation of `key` failed before the store was complete."""
    with transaction(factory) as session:
        session.execute(
            update(Precompute)
            .where(Precompute.key == key, Precompute.status != "complete")
            .values(status="failed")
        )


def computed(
    factory: sessionmaker[Session], key: str, store: ValueStore, *, job_id: str, tokens: int | None
) -> None:
    """Job `job_id` computed the store of `key`."""
    with transaction(factory) as session:
        row = session.get(Precompute, key, with_for_update=True)
        assert row is not None
        _mark_complete(row, store, job_id=job_id, tokens=tokens)


def _mark_complete(row: Precompute, store: ValueStore, *, job_id: str | None, tokens: int | None) -> None:
    row.status, row.completed_at = "complete", utcnow()
    row.pairs, row.bytes = store.num_pairs, store.nbytes()
    if job_id is not None:
        row.job_id = job_id
    row.tokens = tokens or row.tokens or store.response_tokens()


def wait_for_recorder(factory: sessionmaker[Session], key: str, store: ValueStore) -> str | None:
    """The job that computed a store this job found in the cache.

    The computing job records itself right after its teacher pass releases the store's lock, so a
    job that waited on that lock (or came just after) may read the row a moment too early: wait
    for the row to be complete, a few seconds at most. A row still `running` after that (a store
    made outside the service, or a computing worker that died just after finishing) is completed
    here, without a computing job.
    """
    deadline = time.monotonic() + RECORDER_WAIT_SECONDS
    while True:
        with transaction(factory) as session:
            row = session.get(Precompute, key, with_for_update=True)
            assert row is not None
            if row.status == "complete":
                return row.job_id
            if time.monotonic() > deadline:
                _mark_complete(row, store, job_id=None, tokens=None)
                return row.job_id
        time.sleep(0.1)
