"""Which jobs have a message waiting in a queue? The reconciler asks before it re-sends a job
whose message may be lost (sending is service.queue's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery import Celery

from service.queue import all_queues, embedded_folders, is_embedded, job_of_task_id, queue_name
from service.settings import Settings


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


def _redis_task_ids(app: Celery, settings: Settings) -> set[str]:
    ids: set[str] = set()
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        for queue in (queue_name(settings, q) for q in all_queues(settings)):
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
        task_ids = _redis_task_ids(app, settings)
    else:
        return None
    return {job for job in map(job_of_task_id, task_ids) if job}
