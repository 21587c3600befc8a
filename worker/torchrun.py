"""The train stage of a job with `num_processes` N > 1: N ranks under torchrun, relayed by the
worker.

    worker process (lease, heartbeat, DB) ──launch──► python -m torch.distributed.run --standalone
        │  ▲                                             --nproc-per-node N -m worker.rank_train RUN
        │  └── RUN/events.jsonl (rank 0's callbacks) ◄──── rank 0 … rank N-1 (DDP/FSDP: tvkd.trainer)
        └────► RUN/ack, RUN/stop

The worker writes RUN/launch.json (the job's spec with this worker's paths, prepared.json, the
value store, the tracker settings, its pid), starts torchrun in a session of its own (a Ctrl-C or
SIGTERM of the worker does not reach the ranks: they stop cooperatively), then, until torchrun
exits, tails rank 0's JSON lines into the job's JobReporter (progress, metrics, events,
checkpoints: the same rows as one process writes) and acknowledges each checkpoint step once
written, so a checkpoint never gets ahead of its metric points. The stop request (cancel, or the
worker shutting down) becomes the RUN/stop file, read by every rank's stop check; the trainer
stops all ranks at one step and rank 0 writes the checkpoint. A lost lease ends torchrun (SIGTERM,
then SIGKILL of it and of every rank) and re-raises LeaseLost, as one process would.

How the attempt ended (worker/rank_train.py's files):
- rank 0 sent its result: the TrainResult, as from `pipeline.train`;
- a rank raised an error of the job's own (data, model, settings, memory): `RankFailed`, with the
  rank's error code and message (the job fails as in one process; an out-of-memory retries with a
  smaller batch through worker.oom);
- otherwise (a rank was killed, or only process-group errors of the survivors: a peer died):
  `RankCrashed`. torchrun has torn the group down; worker.tasks hands the job back and it resumes
  from its last checkpoint, at most TVKD_MAX_RESENDS times.

Source: issue 11 ("The service"); README "Scaling".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tvkd.config import JobSpec
from tvkd.prepared import PREPARED_FILE, Prepared, write_prepared
from tvkd.stage_results import TrainResult
from tvkd.store import ValueStore
from worker import rank_train
from worker.context import StageContext
from worker.errors import RankCrashed, RankFailed
from worker.reporting import LeaseLost

log = logging.getLogger("tvkd.worker")
RUN_DIR = "torchrun"  # under the job's output folder
POLL_SECONDS = 0.1
TERM_GRACE_SECONDS = 20.0
LOG_TAIL_LINES = 30
REPO_ROOT = Path(__file__).resolve().parents[1]


def command(processes: int, run_dir: Path) -> list[str]:
    """The torchrun command line of one attempt."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
        "--max-restarts", "0", "-m", "worker.rank_train", str(run_dir),
    ]  # fmt: skip


def _prepare_run_dir(ctx: StageContext, spec: JobSpec, prepared: Prepared, store: ValueStore | None) -> Path:
    out = Path(spec.output_dir)
    prepared_path = out / PREPARED_FILE
    if not prepared_path.is_file():  # a job validated before prepared.json existed
        write_prepared(prepared_path, prepared)
    run_dir = out / RUN_DIR
    shutil.rmtree(run_dir, ignore_errors=True)  # the files of an earlier attempt
    run_dir.mkdir(parents=True)
    launch = {
        "spec": spec.to_dict(),
        "prepared": str(prepared_path),
        "store": str(store.path) if store is not None else None,
        "trackers": dataclasses.asdict(ctx.settings.tracker_settings(ctx.job.id)),
        "worker_pid": os.getpid(),
    }
    (run_dir / rank_train.LAUNCH).write_text(json.dumps(launch))
    (run_dir / rank_train.EVENTS).touch()
    return run_dir


class _Relay:
    """Tails rank 0's events.jsonl into the job's reporter and acknowledges sync lines."""

    def __init__(self, ctx: StageContext, run_dir: Path) -> None:
        self.ctx, self.run_dir = ctx, run_dir
        self.fh: IO[str] = open(run_dir / rank_train.EVENTS, encoding="utf-8")  # noqa: SIM115
        self.partial = ""
        self.result: dict[str, Any] | None = None

    def pump(self) -> None:
        """Relay every complete line written so far."""
        chunk = self.fh.read()
        if not chunk:
            return
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self._relay(json.loads(line))

    def _relay(self, rec: dict[str, Any]) -> None:
        reporter, hook = self.ctx.reporter, rec["hook"]
        if hook == "stage":
            reporter.on_stage(rec["stage"], rec["info"])
        elif hook == "progress":
            reporter.on_progress(rec["stage"], rec["done"], rec["total"], rec["eta"])
        elif hook == "metrics":
            reporter.on_metrics(rec["step"], rec["metrics"], rec["split"])
        elif hook == "event":
            reporter.on_event(rec["level"], rec["message"], rec["data"])
        elif hook == "checkpoint":
            reporter.on_checkpoint(rec["step"], rec["path"])
        elif hook == "result":
            self.result = rec["result"]
        if rec.get("sync"):
            reporter.flush()
            tmp = self.run_dir / f"{rank_train.ACK}.tmp"
            tmp.write_text(str(rec["seq"]))
            os.replace(tmp, self.run_dir / rank_train.ACK)

    def close(self) -> None:
        self.fh.close()


def _stop_ranks(proc: subprocess.Popen[bytes], run_dir: Path, processes: int) -> None:
    """End torchrun (it tears its ranks down on SIGTERM), then SIGKILL it and any rank left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for rank in range(processes):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(rank_train.pid_file(run_dir, rank).read_text()), signal.SIGKILL)


def _log_tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        return ""


def _outcome(run_dir: Path, processes: int, returncode: int, result: dict[str, Any] | None) -> TrainResult:
    errors = []
    for rank in range(processes):
        path = rank_train.error_file(run_dir, rank)
        if path.is_file():
            errors.append((rank, json.loads(path.read_text())))
    own = [(rank, e) for rank, e in errors if not e.get("communication")]
    if own:
        rank, error = own[0]
        message = f"rank {rank} of {processes}: {error['type']}: {error['message']}"
        raise RankFailed(error["code"], message, rank, error.get("traceback") or [])
    if returncode == 0 and result is not None:
        return TrainResult(**result)
    silent = [r for r in range(processes) if not rank_train.done_file(run_dir, r).is_file()]
    summary = _crash_summary(_log_tail(run_dir / "torchrun.log"))
    raise RankCrashed(
        f"torchrun exited with code {returncode}; rank(s) {silent or 'none'} of {processes} did not finish "
        f"(killed, or a peer died){': ' + summary if summary else ''}"
    )


def _crash_summary(tail: str) -> str:
    """What torchrun's log says went wrong: from its 'Root Cause (first observed failure)' block,
    'first failure: rank R (local_rank: L), exitcode -9 (pid: P)  (SIGKILL)'; without one, the last
    line holding a letter or digit (not a '=====' rule); '' for an empty log."""
    lines = tail.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Root Cause"):
            fields = {}
            for entry in lines[i + 1 :]:
                key, sep, value = entry.partition(":")
                if sep and key.strip() in ("rank", "exitcode"):
                    fields.setdefault(key.strip(), value.strip())
            if fields:
                return "first failure: " + ", ".join(f"{k} {v}" for k, v in fields.items())
    return next((ln.strip() for ln in reversed(lines) if any(c.isalnum() for c in ln)), "")


def train_under_torchrun(
    ctx: StageContext, spec: JobSpec, prepared: Prepared, store: ValueStore | None
) -> TrainResult:
    """One attempt of the train stage in `spec.train.num_processes` ranks (module doc). Raises
    RankFailed, RankCrashed or LeaseLost."""
    processes = spec.train.num_processes
    run_dir = _prepare_run_dir(ctx, spec, prepared, store)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    ctx.reporter.event(
        "info",
        f"train runs in {processes} processes under torchrun",
        {"num_processes": processes, "run_dir": ctx.rel(run_dir)},
    )
    with open(run_dir / "torchrun.log", "wb") as log_fh:
        proc = subprocess.Popen(
            command(processes, run_dir), env=env, cwd=str(REPO_ROOT), stdout=log_fh,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    relay = _Relay(ctx, run_dir)
    stop_sent = False
    try:
        while True:
            exited = proc.poll() is not None
            relay.pump()
            if ctx.flags.lease_lost:
                raise LeaseLost(ctx.job.id)
            if not stop_sent and ctx.reporter.should_stop():
                (run_dir / rank_train.STOP).touch()
                stop_sent = True
                log.info("job %s: stop requested; signalled the %d ranks", ctx.job.id, processes)
            if exited:
                relay.pump()
                break
            time.sleep(POLL_SECONDS)
    except BaseException:
        _stop_ranks(proc, run_dir, processes)
        raise
    finally:
        relay.close()
    return _outcome(run_dir, processes, proc.returncode, relay.result)


__all__ = ["LeaseLost", "RankCrashed", "RankFailed", "command", "train_under_torchrun"]
