"""`tvkd worker`: a Celery worker for the service's job stages (plus the reconciler thread).

Pool: with --concurrency 1 (the default: one GPU job per worker process) the worker runs tasks
in its own main process (Celery's `solo` pool): torch is never used across a fork (a forked
torch/CUDA/OpenMP runtime can deadlock), and `kill -9` of the worker is a clean crash of the one
process that holds the job. With --concurrency N > 1 it runs N tasks on threads (`threads`
pool), for CPU stages or several small jobs on one device. Run one worker process per GPU
(TVKD_DEVICE=cuda:0, cuda:1, ...).

Devices: a worker advertises D devices (--devices, else TVKD_WORKER_DEVICES, else the CUDA device
count, 1 without CUDA) and takes the train stage of jobs asking for up to D processes (queues
`train`, `train.n2` … `train.n<D>`); such a stage runs under torchrun with one process per device
(worker/torchrun.py). One worker process per multi-GPU host, then, rather than one per GPU.

Like `tvkd serve`, this is a server command: it imports the service and worker packages
lazily, so the `tvkd` library itself never depends on them.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

DEFAULT_QUEUES = "default,precompute,train"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run a worker for the service's job stages (Celery)",
        description="Consume job stages from the broker (TVKD_BROKER_URL, or the embedded broker under "
        "TVKD_HOME when empty) and record progress in the database (TVKD_DATABASE_URL).",
    )
    p.add_argument(
        "--queues",
        default=DEFAULT_QUEUES,
        help="comma-separated queues: default (validate), precompute, train (train, evaluate) "
        f"(default: {DEFAULT_QUEUES})",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="tasks at once (default 1: in the worker's own process; N > 1: N threads)",
    )
    p.add_argument(
        "--devices",
        type=int,
        help="devices this worker advertises: it takes train stages of jobs with num_processes up to "
        "this many (default: TVKD_WORKER_DEVICES, else the CUDA device count, 1 without CUDA)",
    )
    p.add_argument("--hostname", help="worker name, e.g. gpu0@%%h (default: celery@<host>)")
    p.add_argument("--loglevel", default="INFO", help="log level (default: INFO)")
    p.add_argument(
        "--no-reconciler",
        dest="reconciler",
        action="store_false",
        help="do not run the reconciler thread (re-enqueues jobs of dead workers and lost messages)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from worker.celery_app import QUEUES, create_app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise SystemExit(
            f"tvkd worker: unknown queue(s) {', '.join(unknown) or '(none)'}; use {', '.join(QUEUES)}"
        )
    if args.concurrency < 1:
        raise SystemExit("tvkd worker: --concurrency must be >= 1")
    settings = get_settings()
    devices = advertised_devices(args.devices if args.devices is not None else settings.worker_devices)
    app = create_app(settings)
    import worker.tasks  # torch and the library now, not on the first job

    worker.tasks.install_shutdown_hook()
    logging.basicConfig(level=args.loglevel.upper())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load tqdm bars only clutter a worker's log
    reconciler = sender = None
    if args.reconciler:
        from worker.reconciler import Reconciler
        from worker.webhooks import WebhookSender

        reconciler = Reconciler(app, settings)
        reconciler.start()
        sender = WebhookSender(settings)  # the jobs' webhook POSTs (service/webhooks.py)
        sender.start()
    from service.queue import queue_name, worker_queues

    # No job asks for more than the limit, and only that many sized queues exist.
    consumed = worker_queues(queues, min(devices, settings.limit_num_processes))
    logging.getLogger("tvkd.worker").info("%d device(s): consuming %s", devices, ", ".join(consumed))
    options: dict[str, Any] = {
        "queues": [queue_name(settings, q) for q in consumed],  # this deployment's names of them
        "concurrency": args.concurrency,
        "pool": "solo" if args.concurrency == 1 else "threads",
        "loglevel": args.loglevel.upper(),
        "without_mingle": True,  # no start-up broadcast round-trip; nothing here needs it
        "without_gossip": True,
        "optimization": "fair",
    }
    if args.hostname:
        from celery.utils.nodenames import default_nodename, host_format

        # As `celery worker` does: expand %h/%n/%d, so leases and logs name the real host.
        options["hostname"] = host_format(default_nodename(args.hostname))
    celery_worker = app.Worker(**options)
    try:
        celery_worker.start()
    finally:
        if reconciler is not None:
            reconciler.stop()
        if sender is not None:
            sender.stop()
    return int(celery_worker.exitcode or 0)


def advertised_devices(setting: int) -> int:
    """The devices a worker advertises: `setting` when > 0, else the CUDA device count (1 without
    CUDA). Raises SystemExit on a negative setting."""
    if setting < 0:
        raise SystemExit("tvkd worker: --devices must be >= 0 (0: the CUDA device count)")
    if setting:
        return setting
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
