"""The broker side of the service: the one Celery app configuration, and sending a job's stage to
its queue. The API sends a new job's first stage (`publish`); the workers (worker/celery_app.py
adds the task bodies to an app made here) send the next stage, and the reconciler re-sends.
Queues and routes come from the stage table (service/statemachine.py).

- Broker: `TVKD_BROKER_URL` (Redis), or when it is empty an embedded broker that needs no
  server: kombu's filesystem transport under `TVKD_HOME/broker`, one folder that every process
  both writes to and reads from (so the API, the workers and a worker enqueueing the next stage
  all share it). Its put is made atomic here (write aside, then rename), because kombu writes
  the message file in place and a polling consumer could otherwise move it away half written.
- No result backend: the database is the truth about jobs; task return values are only logged.
- Queue names are namespaced per deployment: `<TVKD_QUEUE_PREFIX>.<queue>`, the prefix derived
  from the database URL when not set (Settings.queue_namespace), and so is the remote-control
  exchange. Two deployments that share a Redis database then never take each other's
  messages (a worker drops a message for a job its database does not know).
- Late acknowledgement (`task_acks_late`, `task_reject_on_worker_lost`), one message reserved
  per worker process (`worker_prefetch_multiplier=1`), JSON only.

Sized stages (the train stage, `Stage.sized`) go to a queue per number of processes: a job with
`hyperparameters.num_processes` N goes to `train` (N = 1) or `train.n<N>`, declared for every N up
to TVKD_LIMIT_NUM_PROCESSES (`all_queues`). A worker advertising D devices consumes `train`,
`train.n2` … `train.n<D>` (`worker_queues`); a job asking for more than any worker has stays
`queued`, its message waiting in its queue (the reconciler sees it there and does not re-send).

A stage's helper tasks (`Stage.helpers`: the precompute stage's shard tasks) go to the stage's
queue as one Celery group (`send_helpers`), with task ids that do not start with the job id.

A message carries only the job id; everything else is read from the database when the task
starts. Its task id is `<job id>:<stage>:<random>`, so that the reconciler can tell which jobs
already have a message waiting in a queue without decoding task arguments. The send time
(`enqueued_at`) is committed *before* publishing: if the broker is down or the process dies in
between, the job is still in the database with a send time, and the reconciler re-sends it once
that time is older than TVKD_REQUEUE_AFTER. A job is therefore never lost to a broker outage; at
worst it is sent twice, and the second message is a no-op (lease + stage checks).

This module must stay free of torch (the API imports it).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

import kombu.exceptions
from celery import Celery, group
from kombu import Queue
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps
from sqlalchemy import select

from service.db import cached_sessions, transaction
from service.jobstate import add_event
from service.settings import Settings
from service.statemachine import QUEUES, STAGES

log = logging.getLogger("tvkd.queue")

# What a failed publish raises once kombu's retries are spent.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    ConnectionError,
    OSError,
)
# Redis redelivers a message left unacknowledged this long. Correctness does not depend on it
# (the reconciler re-enqueues a job whose worker died after HEARTBEAT_TIMEOUT, and a redelivered
# duplicate is a no-op because of the lease and stage checks), so it is set longer than most
# stages run: a shorter one would only redeliver running training tasks as harmless duplicates.
VISIBILITY_TIMEOUT = 6 * 3600
# Publishing retries: the API must answer quickly (a job left unsent is re-sent by the
# reconciler), a worker handing a job to the next stage can afford to wait for a broker blip.
API_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}
WORKER_PUBLISH_RETRY = {"max_retries": 8, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}
FILESYSTEM_POLL_SECONDS = 0.25


class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel with an atomic put: the message is written under a temporary
    folder and renamed into the queue folder, so a consumer never reads a half-written file."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        tmp_dir = Path(self.transport_options.get("tmp_folder") or Path(self.data_folder_out) / ".tmp")
        tmp = tmp_dir / name
        tmp.write_bytes(str_to_bytes(dumps(payload)))
        os.replace(tmp, Path(self.data_folder_out) / name)


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = AtomicFilesystemChannel


def is_embedded(settings: Settings) -> bool:
    return not settings.broker_url.strip()


def embedded_folders(settings: Settings) -> dict[str, Path]:
    root = settings.embedded_broker_dir
    return {
        "messages": root / "messages",
        "processed": root / "processed",
        "control": root / "control",
        "tmp": root / "tmp",
    }


def _broker(settings: Settings) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(broker URL, transport options, extra Celery config) for the settings."""
    if not is_embedded(settings):
        return settings.broker_url, {"visibility_timeout": VISIBILITY_TIMEOUT}, {}
    folders = embedded_folders(settings)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    options = {
        # One folder for both directions: every process is producer and consumer.
        "data_folder_in": str(folders["messages"]),
        "data_folder_out": str(folders["messages"]),
        # Processed messages are renamed (atomic on one filesystem, so two consumers racing for a
        # file cannot both get it) into a folder beside the queue, and pruned by the reconciler.
        "store_processed": True,
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "tmp_folder": str(folders["tmp"]),
        "polling_interval": FILESYSTEM_POLL_SECONDS,
    }
    extra = {
        "broker_transport": f"{__name__}:AtomicFilesystemTransport",
        # Remote control would bind a reply queue per worker in the control folder that outlives
        # the worker; nothing here needs broadcast commands.
        "worker_enable_remote_control": False,
    }
    return "filesystem://localhost//", options, extra


def queue_name(settings: Settings, queue: str) -> str:
    """The broker's name of this deployment's `queue` (one of `all_queues`)."""
    return f"{settings.queue_namespace}.{queue}"


SIZED_QUEUES: tuple[str, ...] = tuple(dict.fromkeys(s.queue for s in STAGES.values() if s.sized))


def sized_queue(queue: str, processes: int) -> str:
    """The queue of a sized stage's job with `processes` processes: `queue` for 1, else `queue.n<N>`."""
    return queue if processes <= 1 else f"{queue}.n{processes}"


def stage_queue(stage: str, processes: int = 1) -> str:
    """The queue (unprefixed) a job's `stage` goes to when the job asks for `processes` processes."""
    s = STAGES[stage]
    return sized_queue(s.queue, processes) if s.sized else s.queue


def all_queues(settings: Settings) -> tuple[str, ...]:
    """Every queue of the deployment: the stage table's, and each sized one for 2..limit processes."""
    extra = [sized_queue(q, n) for q in SIZED_QUEUES for n in range(2, settings.limit_num_processes + 1)]
    return (*QUEUES, *extra)


def worker_queues(queues: list[str], devices: int) -> list[str]:
    """The queues a worker consumes when asked for `queues` (of statemachine.QUEUES) and it has
    `devices` devices: each sized queue for 1..devices processes."""
    out: list[str] = []
    for q in queues:
        out.append(q)
        if q in SIZED_QUEUES:
            out += [sized_queue(q, n) for n in range(2, devices + 1)]
    return out


def job_processes(settings: Settings, job_id: str) -> int:
    """The job's `num_processes` as its stored spec says (1 for an unknown job or spec)."""
    from service.models import Job

    with cached_sessions(settings.resolved_database_url)() as session:
        spec = session.scalar(select(Job.spec).where(Job.id == job_id))
    value = ((spec or {}).get("train") or {}).get("num_processes", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def create_app(settings: Settings) -> Celery:
    """A Celery app for these settings, without task bodies (worker/celery_app.py adds them)."""
    url, transport_options, extra = _broker(settings)
    app = Celery("tvkd", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for the broker as long as it takes
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A broker blip must not abort a training run in flight; the lease keeps it single.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=[
            Queue(queue_name(settings, q), routing_key=queue_name(settings, q)) for q in all_queues(settings)
        ],
        task_default_queue=queue_name(settings, "default"),
        task_create_missing_queues=False,
        task_routes={
            task: {"queue": queue_name(settings, s.queue), "routing_key": queue_name(settings, s.queue)}
            for s in STAGES.values()
            for task in (s.task, *s.helpers)
        },
        control_exchange=f"{settings.queue_namespace}.celery",
        task_publish_retry=True,
        task_publish_retry_policy=WORKER_PUBLISH_RETRY,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
        **extra,
    )
    app.tvkd_settings = settings  # type: ignore[attr-defined]  # read by the tasks
    return app


_apps: dict[tuple[str, str, str], Celery] = {}
_apps_lock = threading.Lock()


def get_app(settings: Settings) -> Celery:
    """The process's app for these settings (one producer pool per process: cheap enqueues)."""
    key = (settings.broker_url.strip(), str(settings.home_dir), settings.resolved_database_url)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = create_app(settings)
        return app


def task_id_for(job_id: str, stage: str) -> str:
    return f"{job_id}:{stage}:{secrets.token_hex(6)}"


def job_of_task_id(task_id: object) -> str | None:
    if not isinstance(task_id, str) or ":" not in task_id:
        return None
    return task_id.split(":", 1)[0]


def send_stage(
    app: Celery,
    job_id: str,
    stage: str,
    *,
    retry_policy: dict[str, Any] | None = None,
    processes: int | None = None,
) -> str:
    """Publish the task of `stage` for the job, to the queue of its size (`stage_queue`; a sized
    stage reads the job's num_processes from the database unless `processes` is given); returns
    the task id. Raises PUBLISH_ERRORS."""
    settings: Settings = app.tvkd_settings  # type: ignore[attr-defined]
    if processes is None:
        processes = job_processes(settings, job_id) if STAGES[stage].sized else 1
    task, queue = STAGES[stage].task, queue_name(settings, stage_queue(stage, processes))
    task_id = task_id_for(job_id, stage)
    app.send_task(
        task,
        args=[job_id],
        task_id=task_id,
        queue=queue,
        routing_key=queue,
        retry=True,
        retry_policy=retry_policy or WORKER_PUBLISH_RETRY,
    )
    return task_id


def send_helpers(app: Celery, job_id: str, stage: str, parts: int) -> list[str]:
    """Publish, as one Celery group, the helper tasks of the job's `stage` for parts 1..parts-1 of
    its work (part 0 is the stage's own task); each gets (job id, part, parts). Their task ids
    start with `helper:`, not with the job id: a helper waiting in a queue is not the job's stage
    message, which the reconciler must still re-send if the stage's task dies. Raises
    PUBLISH_ERRORS."""
    settings: Settings = app.tvkd_settings  # type: ignore[attr-defined]
    (task,) = STAGES[stage].helpers
    queue = queue_name(settings, STAGES[stage].queue)
    ids = [f"helper:{job_id}:{stage}:{p}:{secrets.token_hex(6)}" for p in range(1, parts)]
    signatures = [
        app.signature(task, args=[job_id, p, parts], task_id=ids[p - 1], queue=queue, routing_key=queue)
        for p in range(1, parts)
    ]
    group(signatures).apply_async(retry=True, retry_policy=WORKER_PUBLISH_RETRY)
    return ids


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
        with transaction(cached_sessions(settings.resolved_database_url)) as session:
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
