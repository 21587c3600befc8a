"""The job state machine, declared once: the statuses a job shows, the stages it runs, and which
moves between them are allowed. Everything else is derived from this module: the API's status
schema (service/schemas/jobs.py), the Celery queues and routes (service/queue.py), the runners
(worker/stages.py: `RUNNERS`), the README's "How a job moves" diagram (scripts/job_states.py) and
the checks of service/jobstate/, the one package that writes a job's status, stage, lease or
progress.

    stage        status while it runs   queue        Celery task        runner          next
    validate     validating             default      tvkd.validate      run_validate    precompute | train
    precompute   precomputing           precompute   tvkd.precompute    run_precompute  train
    train        training               train        tvkd.train         run_train       evaluate
    evaluate     evaluating             train        tvkd.evaluate      run_evaluate    (succeeded)

A stage may have *helpers*: Celery tasks on its queue that share its work without holding the
job's lease. The precompute stage's is `tvkd.precompute_shard`: a large store is split K ways
(TVKD_PRECOMPUTE_SHARD_TASKS), the stage's own task sends K-1 shard tasks (worker/fanout.py),
every task computes shards of the same store, and the stage's task, which keeps the lease, the
heartbeat and the cancel, waits for the last shard, writes the manifest and advances the job;
the job shows `precomputing` throughout.

A stage marked *sized* (train) goes to a queue per number of processes the job asks for
(`hyperparameters.num_processes`): `train` for 1, `train.n2` for 2, …; a worker that advertises D
devices consumes the sized queues for 1..D (service/queue.py: `stage_queue`, `worker_queues`), so
a job waits in its queue until a worker that fits takes it. Evaluate runs in one process.

Between two stages a job shows `queued`; the first stage's status (`validating`) is also shown
while the job waits for it. A job that names another job's output (`"job:<id>"` as its teacher
or student) shows `waiting` until those jobs have succeeded, then goes on to `validating` (or
ends `failed` if one of them fails or is cancelled).

A job's kind decides its path through the stages (`PATHS`):

    tvkd   validate → precompute → train → evaluate
    dpo    validate → train → evaluate            (alpha 0: no teacher, no precompute)
    sft    validate → train → evaluate            (supervised fine-tuning)

A stage's runner may return another of its `next` stages (validate skips precompute when a tvkd
job's method uses no teacher); otherwise the job follows its kind's path, and a stage at the end
of it ends the job `succeeded`. Adding a stage, or another kind's path through the stages, is an
entry here plus a runner in worker/stages.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """What a job is doing, as the API shows it (`job.status`)."""

    WAITING = "waiting"  #: Waits for the jobs it names (`job:<id>`) to succeed; nothing runs yet.
    VALIDATING = "validating"  #: Submitted; its data, models and settings are being checked.
    QUEUED = "queued"  #: Waiting in a queue for its next stage.
    PRECOMPUTING = "precomputing"  #: The teacher pass writes the value store (or reuses it).
    TRAINING = "training"  #: The reference pass and the TVKD training of the student.
    EVALUATING = "evaluating"  #: The saved student is scored on the held-out pairs; results recorded.
    SUCCEEDED = "succeeded"  #: Done: the model folder, metrics and samples are in place. Final.
    FAILED = "failed"  #: Stopped by an error; `error` says which. Final.
    CANCELLING = "cancelling"  #: Cancel requested; the worker stops at its next step.
    CANCELLED = "cancelled"  #: Stopped by the user (training keeps its last checkpoint). Final.


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})


@dataclass(frozen=True)
class Stage:
    """One stage of a job: what runs, where, and what may follow."""

    name: str
    status: Status  # shown while the stage runs
    queue: str  # the Celery queue its message goes to (workers choose queues: CPU or GPU)
    task: str  # the Celery task name
    runner: str  # the function of worker/stages.py that does the work
    next: tuple[str, ...]  # stages that may follow, the usual one first; () = the last stage
    doc: str
    sized: bool = False  # runs in num_processes processes: its queue is split by that number
    helpers: tuple[str, ...] = ()  # Celery tasks on its queue sharing its work (no lease, no job writes)

    @property
    def last(self) -> bool:
        return not self.next


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "validate",
            Status.VALIDATING,
            "default",
            "tvkd.validate",
            "run_validate",
            ("precompute", "train"),
            "read and split the data, load the tokenizers, check every pair; writes prepared.json",
        ),
        Stage(
            "precompute",
            Status.PRECOMPUTING,
            "precompute",
            "tvkd.precompute",
            "run_precompute",
            ("train",),
            "the teacher's values of every pair into the shared value store (reused by content key)",
            helpers=("tvkd.precompute_shard",),
        ),
        Stage(
            "train",
            Status.TRAINING,
            "train",
            "tvkd.train",
            "run_train",
            ("evaluate",),
            "reference log-probs, then TVKD training with checkpoints; saves the model folder",
            sized=True,
        ),
        Stage(
            "evaluate",
            Status.EVALUATING,
            "train",
            "tvkd.evaluate",
            "run_evaluate",
            (),
            "loads the saved model folder: held-out metrics and samples.json; writes result.json",
        ),
    )
}
FIRST_STAGE = "validate"
# Each job kind's stages in order (tvkd.config.JOB_KINDS); every step is one of the stage's `next`.
PATHS: dict[str, tuple[str, ...]] = {
    "tvkd": ("validate", "precompute", "train", "evaluate"),
    "dpo": ("validate", "train", "evaluate"),
    "sft": ("validate", "train", "evaluate"),
}
for _path in PATHS.values():
    assert _path[0] == FIRST_STAGE and STAGES[_path[-1]].last
    assert all(b in STAGES[a].next for a, b in itertools.pairwise(_path)), _path


def next_stage(kind: str, stage: str) -> str | None:
    """The stage after `stage` on the path of `kind` (None: the last one, the job succeeds)."""
    path = PATHS[kind]
    k = path.index(stage)
    return path[k + 1] if k + 1 < len(path) else None


QUEUES: tuple[str, ...] = tuple(dict.fromkeys(s.queue for s in STAGES.values()))
# A job in one of these has not started any work yet: cancel ends it at once.
NOT_STARTED = frozenset({Status.WAITING, STAGES[FIRST_STAGE].status, Status.QUEUED})
RUNNING = frozenset(s.status for s in STAGES.values())


def _transitions() -> dict[Status, frozenset[Status]]:
    """Status → the statuses it may move to (a status may always stay what it is)."""
    out: dict[Status, set[Status]] = {s: set() for s in Status}
    stops = {Status.FAILED, Status.CANCELLED, Status.CANCELLING}
    # A worker starts the next stage; or the job is cancelled (nothing runs: it ends at once) or
    # failed without running (e.g. its re-sends are exhausted).
    out[Status.QUEUED] |= RUNNING | {Status.FAILED, Status.CANCELLED}
    # A waiting job starts its first stage once the jobs it needs succeeded; fails when one of
    # them failed or was cancelled; or is cancelled.
    out[Status.WAITING] |= {STAGES[FIRST_STAGE].status, Status.FAILED, Status.CANCELLED}
    for stage in STAGES.values():
        out[stage.status] |= {Status.QUEUED} | stops  # a stage hands over (or back), fails, stops
        if stage.last:
            out[stage.status].add(Status.SUCCEEDED)
    # Cancelling: the worker stops at its next step (or the last stage finishes first).
    out[Status.CANCELLING] |= {Status.CANCELLED, Status.FAILED} | {
        Status.SUCCEEDED for s in STAGES.values() if s.last
    }
    for status in TERMINAL:
        out[status] = set()
    return {s: frozenset(targets - {s}) for s, targets in out.items()}


TRANSITIONS = _transitions()


def can_move(current: str, new: str) -> bool:
    """Whether a job in status `current` may move to `new` (a status that is not final may stay
    what it is: e.g. `validating` while it waits and while its validate stage runs)."""
    if current == new:
        return current not in TERMINAL
    return Status(new) in TRANSITIONS[Status(current)]


def stage_of_task(task: str) -> str:
    """The stage a Celery task runs."""
    return next(s.name for s in STAGES.values() if s.task == task)
