"""Sending a job's current stage to its queue: the one entry point of the API (`enqueue`), also
used by the workers (next stage) and the reconciler (re-sends).

A message carries only the job id; everything else is read from the database when the task
starts. Its task id is `<job id>:<stage>:<random>`, so that the reconciler can tell which jobs
already have a message waiting in a queue (`queued_job_ids`) without decoding task arguments.

`enqueue` records `enqueued_at` (committed) *before* publishing: if the broker is down or the
process dies in between, the job is still in the database with a send time, and the reconciler
re-sends it once that time is older than TVKD_REQUEUE_AFTER. A job is therefore never lost to a
broker outage; at worst it is sent twice, and the second message is a no-op (lease + stage checks).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

import kombu.exceptions
from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, session_factory, transaction
from service.jobstate import add_event
from service.models import TERMINAL, Job, utcnow
from service.settings import Settings
from worker.celery_app import (
    API_PUBLISH_RETRY,
    QUEUES,
    STAGE_TASKS,
    WORKER_PUBLISH_RETRY,
    embedded_folders,
    get_app,
    is_embedded,
)

log = logging.getLogger("tvkd.worker")

# What a failed publish raises once kombu's retries are spent.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    ConnectionError,
    OSError,
)

_factories: dict[str, sessionmaker[Session]] = {}
_factories_lock = threading.Lock()


def sessions(settings: Settings) -> sessionmaker[Session]:
    """One engine (connection pool) per database URL per process."""
    url = settings.resolved_database_url
    with _factories_lock:
        factory = _factories.get(url)
        if factory is None:
            factory = _factories[url] = session_factory(make_engine(url))
        return factory


def task_id_for(job_id: str, stage: str) -> str:
    return f"{job_id}:{stage}:{secrets.token_hex(6)}"


def job_of_task_id(task_id: object) -> str | None:
    if not isinstance(task_id, str) or ":" not in task_id:
        return None
    return task_id.split(":", 1)[0]


def send_stage(app: Celery, job_id: str, stage: str, *, retry_policy: dict[str, Any] | None = None) -> str:
    """Publish the task of `stage` for the job; returns the task id. Raises PUBLISH_ERRORS."""
    name, queue = STAGE_TASKS[stage]
    task_id = task_id_for(job_id, stage)
    app.send_task(
        name,
        args=[job_id],
        task_id=task_id,
        queue=queue,
        routing_key=queue,
        retry=True,
        retry_policy=retry_policy or WORKER_PUBLISH_RETRY,
    )
    return task_id


def enqueue(settings: Settings, job_id: str) -> None:
    """Send the job's current stage (job.stage) to its queue and record `enqueued_at`.

    Cheap: one UPDATE … RETURNING and one publish on a pooled broker connection. A terminal
    (e.g. already cancelled) or unknown job is not sent. A broker that stays down through a short
    retry is logged and recorded as an event, not raised: the job is safe in the database and the
    reconciler sends it when the broker is back.
    """
    factory = sessions(settings)
    with transaction(factory) as session:
        stage = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.not_in(TERMINAL))
            .values(enqueued_at=utcnow())
            .returning(Job.stage)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
    if stage is None:
        log.info("enqueue %s: no such job, or it is finished; nothing sent", job_id)
        return
    publish(settings, job_id, stage)


def publish(settings: Settings, job_id: str, stage: str) -> None:
    """Publish the stage's message for a job whose `enqueued_at` the caller has already committed
    (the API sets it in the INSERT of a new job, saving a transaction). A broker that stays down
    through a short retry is logged and recorded as an event, not raised."""
    try:
        send_stage(get_app(settings), job_id, stage, retry_policy=API_PUBLISH_RETRY)
    except PUBLISH_ERRORS as exc:
        log.warning(
            "enqueue %s (%s): broker unavailable (%s); the reconciler will re-send it", job_id, stage, exc
        )
        with transaction(sessions(settings)) as session:
            add_event(
                session,
                job_id,
                f"the broker is unavailable ({type(exc).__name__}); the job is kept and will be sent "
                "when the broker is back",
                level="warning",
                stage=stage,
            )


def warm_up(settings: Settings) -> None:
    """Create the app and open a pooled broker connection now (e.g. at API start-up), so that the
    first `enqueue` does not pay for it."""
    app = get_app(settings)
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)


# --------------------------------------------------------------------------------------------
# Which jobs have a message waiting in a queue?


def _task_id_of(payload: Any) -> str | None:
    if isinstance(payload, bytes | str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return None
    if not isinstance(payload, dict):
        return None
    headers = payload.get("headers") or {}
    properties = payload.get("properties") or {}
    return headers.get("id") or properties.get("correlation_id")


def _redis_task_ids(app: Celery) -> set[str]:
    ids: set[str] = set()
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        for queue in QUEUES:
            for pri in channel.priority_steps:
                for raw in client.lrange(channel._q_for_pri(queue, pri), 0, -1):
                    task_id = _task_id_of(raw)
                    if task_id:
                        ids.add(task_id)
    return ids


def _filesystem_task_ids(settings: Settings) -> set[str]:
    ids: set[str] = set()
    folder = embedded_folders(settings)["messages"]
    for path in Path(folder).glob("*.msg"):
        try:
            task_id = _task_id_of(path.read_bytes())
        except OSError:  # consumed meanwhile
            continue
        if task_id:
            ids.add(task_id)
    return ids


def queued_job_ids(app: Celery, settings: Settings) -> set[str] | None:
    """Job ids that have a message waiting (not yet delivered) in one of our queues, or None when
    the transport cannot be inspected (the caller then rate-limits re-sends instead)."""
    if is_embedded(settings):
        task_ids = _filesystem_task_ids(settings)
    elif settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        task_ids = _redis_task_ids(app)
    else:
        return None
    return {job for job in map(job_of_task_id, task_ids) if job}
