"""The workers' Celery app: service.queue's app (broker, queues, routes from the stage table)
with a task body per stage and per stage helper (`Stage.helpers`: worker/fanout.py). The bodies
import worker.tasks (torch and transformers) only when they run, so that building the app stays
cheap.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service import queue
from service.settings import Settings
from service.statemachine import QUEUES, STAGES

__all__ = ["QUEUES", "create_app"]


def create_app(settings: Settings) -> Celery:
    app = queue.create_app(settings)
    for stage in STAGES.values():

        def run(self: Any, job_id: str, _stage: str = stage.name) -> str:
            from worker.tasks import run_task  # torch and transformers: worker processes only

            return run_task(self.app, _stage, job_id, worker=self.request.hostname or "worker")

        app.task(name=stage.task, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(
            run
        )
        for helper in stage.helpers:

            def help_(self: Any, job_id: str, part: int, parts: int, _helper: str = helper) -> str:
                from worker.fanout import HELPERS  # torch and transformers: worker processes only

                return HELPERS[_helper](
                    self.app, job_id, part, parts, worker=self.request.hostname or "worker"
                )

            app.task(name=helper, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(
                help_
            )
    return app
