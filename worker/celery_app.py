"""The Celery app of the workers, built from the service settings.

- Broker: `TVKD_BROKER_URL` (Redis), or when it is empty an embedded broker that needs no
  server: kombu's filesystem transport under `TVKD_HOME/broker`, one folder that every process
  both writes to and reads from (so the API, the workers and a worker enqueueing the next stage
  all share it). Its put is made atomic here (write aside, then rename), because kombu writes
  the message file in place and a polling consumer could otherwise move it away half written.
- No result backend: the database is the truth about jobs; task return values are only logged.
- Late acknowledgement (`task_acks_late`, `task_reject_on_worker_lost`), one message reserved
  per worker process (`worker_prefetch_multiplier=1`), JSON only.
- Queues `default` (validate, evaluate), `precompute` and `train` (GPU work). Reference and
  train are one task, `tvkd.train`: the Trainer computes π_ref in its setup and reuses the file on
  resume, so a job whose stage is "reference" or "train" is sent to the same task.

The API process imports this module (through worker.dispatch) to send messages; it must stay
free of torch, so the task bodies (worker.tasks) are imported lazily, inside the tasks.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from service.settings import Settings

log = logging.getLogger("tvkd.worker")

QUEUES = ("default", "precompute", "train")
# Stage of a job → (task name, queue).
STAGE_TASKS: dict[str, tuple[str, str]] = {
    "validate": ("tvkd.validate", "default"),
    "precompute": ("tvkd.precompute", "precompute"),
    "reference": ("tvkd.train", "train"),
    "train": ("tvkd.train", "train"),
    "evaluate": ("tvkd.evaluate", "default"),
}
# Task name → the job stages it runs (a message for a job in another stage is stale: a no-op).
TASK_STAGES: dict[str, frozenset[str]] = {
    name: frozenset(stage for stage, (n, _) in STAGE_TASKS.items() if n == name)
    for name, _ in STAGE_TASKS.values()
}
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


def create_app(settings: Settings) -> Celery:
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
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue="default",
        task_create_missing_queues=False,
        task_routes={name: {"queue": queue, "routing_key": queue} for name, queue in STAGE_TASKS.values()},
        task_publish_retry=True,
        task_publish_retry_policy=WORKER_PUBLISH_RETRY,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
        **extra,
    )
    app.tvkd_settings = settings  # type: ignore[attr-defined]  # read by the tasks
    _register_tasks(app)
    return app


def _register_tasks(app: Celery) -> None:
    for name in TASK_STAGES:

        def run(self: Any, job_id: str, _name: str = name) -> str:
            from worker.tasks import run_task  # torch and transformers: worker processes only

            return run_task(self.app, _name, job_id, worker=self.request.hostname or "worker")

        app.task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run)


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
