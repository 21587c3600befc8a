"""One job's teacher precompute shared by several workers (README "Scaling").

    stage task tvkd.precompute (holds the lease)
      ├─ send_helpers: K-1 shard tasks tvkd.precompute_shard (part 1..K-1) as one Celery group
      ├─ computes part 0 (shards i ≡ 0 mod K), then any shard no task holds, then waits for the
      │  shards other tasks hold (a task whose worker died let go of its shard: computed here)
      └─ pipeline.precompute: every shard is on disk, so it only writes the manifest (the merge);
         teacher check, the Precompute row, advance to train — as for one task
    shard task p: part p's shards, then any shard no task holds; never waits, never writes the job

K = min(TVKD_PRECOMPUTE_SHARD_TASKS, the store's shards); K = 1 is the one-task precompute. Every
task runs `tvkd.precompute.precompute_shards` on the same content key, each shard under its own
file lock, so a shard is computed once whoever gets to it, a shard on disk is never redone, and a
re-delivered or late shard task finds nothing to do. A shard records the worker and pid that
wrote it (the manifest's timings.shards). The job shows `precomputing` throughout; its lease,
heartbeat and cancel are the stage task's, as before. A shard task stops at its next batch when
the job is cancelled, has left the precompute stage or ended, or its worker shuts down. A shard
task that fails records a warning event and leaves its shards to the others: the stage task
computes them, and fails the stage with the same error if it is the data's or the teacher's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.db import cached_sessions, in_transaction
from service.jobstate import add_event
from service.models import Job
from service.queue import PUBLISH_ERRORS, send_helpers
from service.settings import Settings
from service.statemachine import TERMINAL
from tvkd import pipeline
from tvkd.config import PrecomputeConfig
from tvkd.precompute import PrecomputeStopped, ShardsResult, num_shards, part_order, precompute_shards
from tvkd.prepared import PREPARED_FILE, Prepared, load_prepared
from worker.context import StageContext, stored_spec
from worker.reporting import SHUTDOWN

log = logging.getLogger("tvkd.worker")
STAGE = "precompute"
CHECK_EVERY = 2.0  # seconds between two reads of the job row by a shard task


def parts_for(settings: Settings, num_pairs: int) -> int:
    """K: how many tasks a precompute of `num_pairs` pairs is split into (1: no fan-out)."""
    config = PrecomputeConfig(shard_size=settings.precompute_shard_size)
    return max(1, min(settings.precompute_shard_tasks, num_shards(num_pairs, config)))


def run_parts(ctx: StageContext, prepared: Prepared, config: PrecomputeConfig, parts: int) -> ShardsResult:
    """The stage task's share of a precompute split `parts` ways: send the shard tasks, compute
    part 0, then every shard not yet written (waiting for those other tasks hold). Every shard is
    on disk when it returns. Raises PrecomputeStopped on cancel or shutdown."""
    spec = ctx.spec
    assert spec.teacher is not None
    try:
        send_helpers(ctx.app, ctx.job.id, STAGE, parts)
        ctx.reporter.event(
            "info",
            f"precompute split into {parts} tasks on the precompute queue (this one and {parts - 1} "
            "shard tasks): every free worker of the queue computes shards of this job's store",
            {"parts": parts},
        )
    except PUBLISH_ERRORS as exc:  # no helpers: this task computes every shard, as with K = 1
        ctx.reporter.event(
            "warning", f"could not send the shard tasks ({type(exc).__name__}); precomputing alone"
        )
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - t0
        ctx.reporter.on_progress(STAGE, done, total, elapsed / done * (total - done) if done else None)

    return precompute_shards(
        spec.teacher,
        prepared.pairs,
        config,
        store_root=spec.store_root,
        shards=part_order(num_shards(len(prepared.pairs), config), 0, parts),
        device=spec.device,
        progress=progress,
        should_stop=ctx.reporter.should_stop,
        on_error=spec.options.on_error,
        teacher_reference=spec.options.teacher_reference,
        made_by={"worker": ctx.worker, "job": ctx.job.id, "part": 0, "parts": parts},
    )


def shards_by_worker(manifest: dict[str, Any]) -> dict[str, int]:
    """{worker: shards it wrote} from a store's manifest (timings.shards)."""
    out: dict[str, int] = {}
    for made_by in manifest.get("timings", {}).get("shards", []):
        who = str(made_by.get("worker") or f"pid {made_by.get('pid')}")
        out[who] = out.get(who, 0) + 1
    return out


def _precomputing(job: Job | None) -> bool:
    return job is not None and job.stage == STAGE and job.status not in TERMINAL and not job.cancel_requested


def _read_job(factory: sessionmaker[Session], job_id: str) -> Job | None:
    with factory() as session:
        job = session.get(Job, job_id)
        if job is not None:
            session.expunge(job)
        return job


def _stop_check(factory: sessionmaker[Session], job_id: str) -> Callable[[], bool]:
    """should_stop of a shard task: the worker shuts down, or (read every CHECK_EVERY seconds)
    the job is cancelled, ended or left the precompute stage. A database error reads as "go on"."""
    state = {"at": time.monotonic(), "stop": False}

    def should_stop() -> bool:
        if SHUTDOWN.is_set() or state["stop"]:
            return True
        if time.monotonic() - float(state["at"]) >= CHECK_EVERY:
            state["at"] = time.monotonic()
            try:
                state["stop"] = not _precomputing(_read_job(factory, job_id))
            except Exception as exc:  # the stage task, which holds the lease, handles outages
                log.warning("job %s: shard task could not read the job (%s); going on", job_id, exc)
        return bool(state["stop"])

    return should_stop


def run_shard_task(app: Celery, job_id: str, part: int, parts: int, *, worker: str) -> str:
    """Body of tvkd.precompute_shard: part `part` of `parts` of the job's store, then any shard no
    task holds. Returns what happened (for the log); writes only the store and events."""
    settings: Settings = app.tvkd_settings  # type: ignore[attr-defined]
    factory = cached_sessions(settings.resolved_database_url)
    job = _read_job(factory, job_id)
    if not _precomputing(job):
        log.info("job %s: shard task %d/%d: the job is not precomputing; nothing to do", job_id, part, parts)
        return "skipped"
    assert job is not None
    spec = stored_spec(settings, factory, job)
    path = Path(spec.output_dir) / PREPARED_FILE
    if spec.teacher is None or not path.is_file():
        return "skipped"  # left to the stage task, which prepares what is missing
    try:
        prepared = load_prepared(spec, path)
        config = pipeline.precompute_config(spec, settings.precompute_shard_size)
        res = precompute_shards(
            spec.teacher,
            prepared.pairs,
            config,
            store_root=spec.store_root,
            shards=part_order(num_shards(len(prepared.pairs), config), part, parts),
            device=spec.device,
            should_stop=_stop_check(factory, job_id),
            on_error=spec.options.on_error,
            teacher_reference=spec.options.teacher_reference,
            made_by={"worker": worker, "job": job_id, "part": part, "parts": parts},
            wait_for_busy=False,
        )
    except PrecomputeStopped:
        log.info("job %s: shard task %d/%d stopped (finished shards are kept)", job_id, part, parts)
        return "stopped"
    except Exception as exc:
        log.exception("job %s: shard task %d/%d failed", job_id, part, parts)
        _event(
            factory, job_id, "warning",
            f"shard task {part}/{parts} on {worker} failed ({type(exc).__name__}: {str(exc)[:500]}); "
            "its shards are left to the stage's task",
            {"worker": worker, "part": part, "parts": parts},
        )  # fmt: skip
        return "failed"
    if res.computed:
        _event(
            factory, job_id, "info",
            f"shard task {part}/{parts} on {worker} computed {len(res.computed)} shards "
            f"({res.tokens} teacher tokens in {res.seconds:.1f}s)",
            {"worker": worker, "part": part, "parts": parts, "shards": res.computed, "tokens": res.tokens},
        )  # fmt: skip
    return f"computed {len(res.computed)} shards"


def _event(
    factory: sessionmaker[Session], job_id: str, level: str, message: str, data: dict[str, Any]
) -> None:
    try:
        in_transaction(
            factory,
            lambda session: add_event(session, job_id, message, level=level, stage=STAGE, data=data),
            what=f"job {job_id}: shard task event",
        )
    except Exception as exc:  # an event is not worth failing a finished shard task for
        log.warning("job %s: could not record a shard task event (%s)", job_id, exc)


HELPERS: dict[str, Callable[..., str]] = {"tvkd.precompute_shard": run_shard_task}
