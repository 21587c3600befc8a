"""One rank of a job's train stage under torchrun (the worker's child; worker/torchrun.py starts
`python -m torch.distributed.run --standalone --nproc-per-node N -m worker.rank_train RUN_DIR`).

The worker process keeps the lease, the heartbeat and every database write; the ranks only train.
Everything they need is in RUN_DIR (written by the parent before the launch):

    launch.json     the job's spec (JobSpec.to_dict, this worker's paths), prepared.json's path,
                    the value store's folder (or null), the tracker settings, the worker's pid
    events.jsonl    rank 0's callbacks, one JSON object a line: {"seq", "hook", ...}; the parent
                    tails it and relays each line through the job's JobReporter
    ack             the last `seq` the parent has written to the database (rank 0 waits for it at
                    a checkpoint step, so a checkpoint never gets ahead of its metric points, as in
                    one process: worker.reporting.JobReporter.on_progress)
    stop            present = stop requested (cancel, worker shutdown): every rank's stop check
                    reads it; the trainer stops all ranks at one step (tvkd.distributed.any_flag)
    rank<r>.pid     each rank's pid (to kill a rank in tests, or the ranks of an orphaned run)
    rank<r>.done    the rank finished training without an error
    rank<r>.error   the rank's exception: {"type", "message", "code", "traceback"}

A rank whose torchrun or worker process is gone (checked at every stop check and while waiting for
an ack) exits at once without writing: the job's lease will be taken over by another worker.

Source: issue 11 ("The service"), README "Scaling".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tvkd.callbacks import Callbacks

LAUNCH, EVENTS, ACK, STOP = "launch.json", "events.jsonl", "ack", "stop"
ACK_POLL_SECONDS = 0.02
ORPHAN_EXIT_CODE = 70


def pid_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank{rank}.pid"


def done_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank{rank}.done"


def error_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank{rank}.error"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RankCallbacks(Callbacks):
    """The callbacks of one rank: rank 0 writes every hook as a JSON line for the parent to relay;
    every rank reads the stop file. A rank whose torchrun or worker is gone exits at once."""

    def __init__(self, run_dir: Path, *, rank: int, worker_pid: int, save_every: int) -> None:
        self.run_dir, self.rank, self.worker_pid, self.save_every = run_dir, rank, worker_pid, save_every
        self.parent = os.getppid()  # torchrun's agent
        self.seq = 0
        self._out = open(run_dir / EVENTS, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115

    def _check_orphan(self) -> None:
        if os.getppid() != self.parent or not _alive(self.worker_pid):
            print(f"rank {self.rank}: the worker or torchrun is gone; exiting", file=sys.stderr, flush=True)
            os._exit(ORPHAN_EXIT_CODE)

    def _write(self, hook: str, *, sync: bool = False, **fields: Any) -> None:
        if self._out is None:
            return
        self.seq += 1
        line = json.dumps({"seq": self.seq, "hook": hook, "sync": sync, **fields}, default=str)
        self._out.write(line + "\n")
        self._out.flush()
        if sync:
            self._wait_ack(self.seq)

    def _wait_ack(self, seq: int) -> None:
        path = self.run_dir / ACK
        while True:
            try:
                if int(path.read_text() or 0) >= seq:
                    return
            except (OSError, ValueError):
                pass
            self._check_orphan()
            time.sleep(ACK_POLL_SECONDS)

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self._write("stage", stage=stage, info=info)

    def on_progress(self, stage: str, done: int, total: int, eta_seconds: float | None) -> None:
        at_checkpoint = stage == "train" and self.save_every and done % self.save_every == 0
        self._write(
            "progress", sync=bool(done >= total or at_checkpoint), stage=stage, done=done, total=total,
            eta=eta_seconds,
        )  # fmt: skip

    def on_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        self._write("metrics", step=step, metrics=metrics, split=split)

    def on_event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._write("event", level=level, message=message, data=data or {})

    def on_checkpoint(self, step: int, path: str) -> None:
        self._write("checkpoint", step=step, path=path)

    def should_stop(self) -> bool:
        self._check_orphan()
        return (self.run_dir / STOP).exists()

    def result(self, result: dict[str, Any]) -> None:
        self._write("result", sync=True, result=result)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def _spec(launch: dict[str, Any], local_rank: int, rank: int) -> Any:
    from tvkd.config import JobSpec

    spec = JobSpec.from_dict(launch["spec"])
    if spec.device.startswith("cuda"):
        spec = dataclasses.replace(spec, device=f"cuda:{local_rank}")
    if rank != 0:  # only rank 0 reports to the trackers
        spec = dataclasses.replace(spec, options=dataclasses.replace(spec.options, report_to=[]))
    return spec


def run(run_dir: Path) -> None:
    """Train this rank's part of the job described by RUN_DIR/launch.json (see the module doc)."""
    from tvkd import distributed, pipeline
    from tvkd.prepared import load_prepared
    from tvkd.store import ValueStore
    from tvkd.trackers import TrackerSettings

    ctx = distributed.context()
    launch = json.loads((run_dir / LAUNCH).read_text())
    pid_file(run_dir, ctx.rank).write_text(str(os.getpid()))
    spec = _spec(launch, ctx.local_rank, ctx.rank)
    callbacks = RankCallbacks(
        run_dir, rank=ctx.rank, worker_pid=int(launch["worker_pid"]), save_every=spec.train.save_every
    )
    try:
        distributed.init()
        prepared = load_prepared(spec, launch["prepared"])
        store = ValueStore.open(launch["store"]) if launch.get("store") else None
        trackers = TrackerSettings(**launch["trackers"]) if launch.get("trackers") and ctx.rank == 0 else None
        result = pipeline.train(spec, prepared, store, callbacks, resume=True, trackers=trackers)
        if ctx.is_main:
            callbacks.result(result.to_dict())
        done_file(run_dir, ctx.rank).write_text("ok")
    finally:
        callbacks.close()
        distributed.destroy()


def _record_error(run_dir: Path, rank: int, exc: BaseException) -> None:
    try:
        from worker.errors import classify

        code = classify(exc, "train")
    except Exception:  # the record must be written even if classifying fails
        code = "internal_error"
    record = {
        "type": type(exc).__name__,
        "message": str(exc) or type(exc).__name__,
        "code": code,
        "communication": _is_communication_error(exc),
        "traceback": "".join(traceback.format_exception(exc)).splitlines()[-25:],
    }
    tmp = error_file(run_dir, rank).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, error_file(run_dir, rank))


def _is_communication_error(exc: BaseException) -> bool:
    """An error of the process group itself (a peer died): a symptom of another rank's crash."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(
        s in text for s in ("connection closed by peer", "connection reset", "gloo", "nccl", "broken pipe")
    )


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        run(run_dir)
    except BaseException as exc:  # recorded for the parent; the rank exits 1
        _record_error(run_dir, rank, exc)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
