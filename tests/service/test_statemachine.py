"""The job state machine is declared once (service/statemachine.py) and enforced by the one module
that writes job state (the service/jobstate/ package): every transition of the table can happen, no other
can, terminal states are final, and the API schema, Celery routes and runners come from the table.
Runs on a real SQLite database (the state functions are plain SQLAlchemy)."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service import jobstate
from service.db import make_engine, session_factory
from service.jobstate import JobStateError, StaleMessage
from service.models import ApiKey, Base, Job
from service.statemachine import (
    FIRST_STAGE,
    NOT_STARTED,
    QUEUES,
    STAGES,
    TERMINAL,
    TRANSITIONS,
    Status,
    can_move,
)

TIMEOUT = 60.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    Base.metadata.create_all(engine)
    factory = session_factory(engine)
    with factory() as s, s.begin():
        s.add(ApiKey(id="key_1", name="k", key_hash="h", hash_scheme="hmac-sha256"))
    yield factory
    engine.dispose()


def _new(db: sessionmaker[Session]) -> str:
    with db() as s, s.begin():
        job = jobstate.new_job(
            owner_id="key_1", teacher="t", student="s", dataset="d", spec={}, spec_hash="x"
        )
        s.add(job)
        s.flush()
        return job.id


def _waiting(db: sessionmaker[Session]) -> tuple[str, str]:
    """(a job `waiting` for another's model, the job it names, not started yet)."""
    named = _new(db)
    with db() as s, s.begin():
        job = jobstate.new_job(
            waiting=True,
            owner_id="key_1",
            teacher="t",
            student=f"job:{named}",
            dataset="d",
            spec={},
            spec_hash="x",
        )
        s.add(job)
        s.flush()
        return job.id, named


def _get(db: sessionmaker[Session], job_id: str) -> Job:
    with db() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _start(db: sessionmaker[Session], job_id: str, stage: str, worker: str = "w1") -> str:
    with db() as s, s.begin():
        claim = jobstate.start_stage(s, job_id, stage, worker, timeout=TIMEOUT, output_dir=f"jobs/{job_id}")
    assert claim.job is not None and claim.token is not None, claim.reason
    return claim.token


def _advance(db: sessionmaker[Session], job_id: str, token: str, to: str) -> None:
    with db() as s, s.begin():
        job = jobstate.held(s, job_id, token)
        assert job is not None
        jobstate.advance(s, job, to, message=f"to {to}")


def _at(db: sessionmaker[Session], stage: str) -> tuple[str, str]:
    """A job running `stage` (reached along the table's first `next` choices): (id, token)."""
    job_id = _new(db)
    return job_id, _at_existing(db, job_id, stage)


def _at_existing(db: sessionmaker[Session], job_id: str, stage: str) -> str:
    """Run the new job `job_id` up to `stage`; its lease token."""
    path = [FIRST_STAGE]
    while path[-1] != stage:
        path.append(next(n for n in STAGES[path[-1]].next if n == stage or _reaches(n, stage)))
    token = _start(db, job_id, path[0])
    for nxt in path[1:]:
        _advance(db, job_id, token, nxt)
        token = _start(db, job_id, nxt)
    return token


def _reaches(a: str, b: str) -> bool:
    return a == b or any(_reaches(n, b) for n in STAGES[a].next)


def _finish(db: sessionmaker[Session], job_id: str, token: str | None, status: Status) -> None:
    with db() as s, s.begin():
        job = jobstate.held(s, job_id, token) if token else s.get(Job, job_id)
        assert job is not None
        jobstate.finish(s, job, status, message=str(status))


def _cancel(db: sessionmaker[Session], job_id: str) -> None:
    with db() as s, s.begin():
        job = s.get(Job, job_id)
        assert job is not None
        jobstate.request_cancel(s, job)


# -------------------------------------------------------------------------------------- the table


def test_the_table_is_consistent() -> None:
    assert FIRST_STAGE in STAGES
    for stage in STAGES.values():
        assert set(stage.next) <= set(STAGES), stage
        assert stage.queue in QUEUES and stage.status not in TERMINAL
    assert [s for s in STAGES.values() if s.last], "some stage must end the job"
    assert all(_reaches(FIRST_STAGE, name) for name in STAGES), "every stage is reachable"
    assert len({s.task for s in STAGES.values()}) == len(STAGES), "one Celery task per stage"


def test_every_status_has_a_doc_comment() -> None:
    source = inspect.getsource(Status)
    lines = {n.targets[0].id: n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)}
    text = source.splitlines()
    for member in Status:
        assert "#: " in text[lines[member.name] - 1], member


def test_runners_routes_and_api_statuses_come_from_the_table() -> None:
    from service.schemas import JobStatus
    from service.settings import Settings
    from worker.celery_app import create_app
    from worker.stages import RUNNERS

    assert set(RUNNERS) == set(STAGES)
    for name, stage in STAGES.items():
        assert RUNNERS[name].__name__ == stage.runner
    from service.queue import queue_name

    settings = Settings(_env_file=None, broker_url="redis://127.0.0.1:6379/0")  # type: ignore[call-arg]
    app = create_app(settings)
    for stage in STAGES.values():
        assert stage.task in app.tasks
        assert app.conf.task_routes[stage.task]["queue"] == queue_name(settings, stage.queue)
    # This deployment's names of the queues: its prefix, then the table's queue; a sized stage's
    # queue once per number of processes up to the operator's limit.
    sized = {f"{s.queue}.n{n}" for s in STAGES.values() if s.sized for n in range(2, 9)}
    assert settings.limit_num_processes == 8 and sized == {f"train.n{n}" for n in range(2, 9)}
    names = {f"{settings.queue_namespace}.{q}" for q in (*QUEUES, *sized)}
    assert {q.name for q in app.conf.task_queues} == names
    assert set(JobStatus.__args__) == {s.value for s in Status}  # type: ignore[attr-defined]


def test_a_job_goes_to_the_queue_of_its_size_and_a_worker_takes_the_sizes_it_fits() -> None:
    from service.queue import stage_queue, worker_queues

    assert stage_queue("train", 1) == "train" and stage_queue("train", 4) == "train.n4"
    assert stage_queue("evaluate", 4) == "train"  # one process: any train worker evaluates
    assert stage_queue("precompute", 4) == "precompute" and stage_queue("validate", 3) == "default"
    assert worker_queues(["default", "train"], 1) == ["default", "train"]
    assert worker_queues(["precompute", "train"], 3) == ["precompute", "train", "train.n2", "train.n3"]
    assert worker_queues(["default"], 4) == ["default"]  # no sized queue asked for


# -------------------------------------------------------------------------------------- transitions


def _queued_at(db: sessionmaker[Session], stage: str) -> str:
    """A job waiting in the queue for `stage` (the stage before it handed over, or at the first
    stage a worker handed it back)."""
    before = [s.name for s in STAGES.values() if stage in s.next and _reaches(FIRST_STAGE, s.name)]
    job_id, token = _at(db, before[0] if before else stage)
    with db() as s, s.begin():
        job = jobstate.held(s, job_id, token)
        assert job is not None
        if before:
            jobstate.advance(s, job, stage, message="next")
        else:
            jobstate.hand_back(s, job, message="worker stops")
    return job_id


def _last() -> str:
    return next(s.name for s in STAGES.values() if s.last)


def _job_in(db: sessionmaker[Session], status: Status, dst: Status) -> tuple[str, str | None]:
    """A job in `status`, set up so that `dst` can follow: (id, lease token or None)."""
    if status == Status.QUEUED:
        target = next((s.name for s in STAGES.values() if s.status == dst), STAGES[FIRST_STAGE].next[0])
        return _queued_at(db, target), None
    if status == Status.CANCELLING:
        job_id, token = _at(db, _last() if dst == Status.SUCCEEDED else FIRST_STAGE)
        _cancel(db, job_id)
        return job_id, token
    if status in TERMINAL:
        job_id, token = _at(db, _last())
        _finish(db, job_id, token, status)
        return job_id, None
    if status == Status.WAITING:
        return _waiting(db)[0], None
    return _at(db, next(s.name for s in STAGES.values() if s.status == status))


def _named(db: sessionmaker[Session], job_id: str) -> str:
    ref = _get(db, job_id).student
    assert ref.startswith("job:")
    return ref[4:]


def _perform(db: sessionmaker[Session], job_id: str, token: str | None, to: Status) -> None:
    """Move the job to `to` through the public function that does so."""
    if _get(db, job_id).status == Status.WAITING and to != Status.CANCELLED:
        # The job it names ends: succeeded releases it to its first stage; failed fails it.
        named = _named(db, job_id)
        if to == Status.FAILED:
            _finish(db, named, None, Status.FAILED)
            assert _get(db, job_id).error_code == "dependency_failed"
        else:
            named_token = _at_existing(db, named, _last())
            _finish(db, named, named_token, Status.SUCCEEDED)
        return
    if to in TERMINAL:
        _finish(db, job_id, token, to)
    elif to == Status.CANCELLING:
        _cancel(db, job_id)
    elif to == Status.QUEUED:  # the stage hands over to its next one, or back (the last stage)
        nxt = STAGES[_get(db, job_id).stage].next
        assert token is not None
        if nxt:
            _advance(db, job_id, token, nxt[0])
        else:
            with db() as s, s.begin():
                job = jobstate.held(s, job_id, token)
                assert job is not None
                jobstate.hand_back(s, job, message="worker stops")
    else:  # a running status: a worker starts the stage the job waits for
        assert _get(db, job_id).stage == next(s.name for s in STAGES.values() if s.status == to)
        _start(db, job_id, _get(db, job_id).stage, worker="w2")


ALLOWED = [
    pytest.param(src, dst, id=f"{src}->{dst}")
    for src, targets in TRANSITIONS.items()
    for dst in sorted(targets)
]


@pytest.mark.parametrize(("src", "dst"), ALLOWED)
def test_every_transition_of_the_table_happens(db: sessionmaker[Session], src: Status, dst: Status) -> None:
    job_id, token = _job_in(db, src, dst)
    assert _get(db, job_id).status == src
    _perform(db, job_id, token, dst)
    assert _get(db, job_id).status == dst


def test_no_other_transition_is_allowed() -> None:
    for src in Status:
        for dst in Status:
            expected = dst in TRANSITIONS[src] or (src == dst and src not in TERMINAL)
            assert can_move(src, dst) == expected, (src, dst)
    for status in TERMINAL:
        assert not TRANSITIONS[status]


@pytest.mark.parametrize("final", sorted(TERMINAL))
def test_terminal_states_are_final(db: sessionmaker[Session], final: Status) -> None:
    job_id, _ = _job_in(db, final, final)
    stage = _get(db, job_id).stage
    with db() as s, s.begin():
        job = s.get(Job, job_id)
        assert job is not None
        for other in TERMINAL:
            jobstate.finish(s, job, other, message="again")  # a no-op
        assert job.status == final
        with pytest.raises(JobStateError):
            jobstate.request_cancel(s, job)
        with pytest.raises(JobStateError):
            jobstate.advance(s, job, STAGES[stage].next[0] if STAGES[stage].next else stage, message="x")
    with db() as s, s.begin():
        claim = jobstate.start_stage(s, job_id, stage, "w9", timeout=TIMEOUT, output_dir="x")
    assert claim.job is None and _get(db, job_id).status == final
    with db() as s, s.begin():
        assert jobstate.mark_sent(s, job_id) is None  # nothing to send


def test_invalid_moves_are_refused(db: sessionmaker[Session]) -> None:
    job_id, token = _at(db, FIRST_STAGE)
    with db() as s, s.begin():
        job = jobstate.held(s, job_id, token)
        assert job is not None
        not_next = [n for n in STAGES if n not in STAGES[FIRST_STAGE].next]
        for stage in not_next:  # a stage may only be followed by its `next` ones
            with pytest.raises(JobStateError, match="cannot be followed"):
                jobstate.advance(s, job, stage, message="skip")
        with pytest.raises(JobStateError, match="cannot succeed"):
            jobstate.finish(s, job, Status.SUCCEEDED, message="too early")
        with pytest.raises(JobStateError, match="not a terminal"):
            jobstate.finish(s, job, Status.TRAINING, message="x")
        with pytest.raises(JobStateError, match="not data columns"):
            jobstate.record(s, job_id, token, status="succeeded")
    assert _get(db, job_id).status == STAGES[FIRST_STAGE].status


def test_a_message_for_another_stage_runs_nothing(db: sessionmaker[Session]) -> None:
    job_id, token = _at(db, FIRST_STAGE)
    _advance(db, job_id, token, STAGES[FIRST_STAGE].next[0])
    with pytest.raises(StaleMessage), db() as s, s.begin():
        jobstate.start_stage(s, job_id, FIRST_STAGE, "w2", timeout=TIMEOUT, output_dir="x")
    job = _get(db, job_id)
    assert job.lease_token is None and job.status == Status.QUEUED  # the lease was rolled back


def test_a_live_lease_is_not_taken_and_a_lost_one_cannot_write(db: sessionmaker[Session]) -> None:
    job_id, token = _at(db, FIRST_STAGE)
    with db() as s, s.begin():
        claim = jobstate.start_stage(s, job_id, FIRST_STAGE, "w2", timeout=TIMEOUT, output_dir="x")
    assert claim.job is None and "w1" in claim.reason
    with db() as s, s.begin():  # the reconciler clears a dead lease: the old holder can write nothing
        job = s.get(Job, job_id)
        assert job is not None
        assert jobstate.reclaim_dead(s, job_id, token, job.heartbeat_at, job.worker)
    with db() as s, s.begin():
        assert jobstate.held(s, job_id, token) is None
        assert not jobstate.set_progress(s, job_id, token, 1, 2, None)
        assert not jobstate.heartbeat(s, job_id, token)


def test_cancel_before_start_ends_at_once_and_a_running_job_goes_cancelling(
    db: sessionmaker[Session],
) -> None:
    waiting = _new(db)
    assert _get(db, waiting).status in NOT_STARTED
    _cancel(db, waiting)
    assert _get(db, waiting).status == Status.CANCELLED
    running, token = _at(db, FIRST_STAGE)
    _cancel(db, running)
    assert _get(db, running).status == Status.CANCELLING
    with db() as s, s.begin():  # its stage starting again (after a crash) ends it instead
        job = s.get(Job, running)
        assert job is not None
        assert jobstate.reclaim_dead(s, running, token, job.heartbeat_at, job.worker)
    with db() as s, s.begin():
        claim = jobstate.start_stage(s, running, FIRST_STAGE, "w2", timeout=TIMEOUT, output_dir="x")
    assert claim.job is None and _get(db, running).status == Status.CANCELLED


def test_a_waiting_job_starts_when_what_it_names_succeeds_and_fails_with_it(
    db: sessionmaker[Session],
) -> None:
    job_id, named = _waiting(db)
    with db() as s, s.begin():  # a stray message for its first stage runs nothing
        claim = jobstate.start_stage(s, job_id, FIRST_STAGE, "w1", timeout=TIMEOUT, output_dir="x")
    assert claim.job is None and "waiting" in claim.reason and _get(db, job_id).status == Status.WAITING
    with db() as s, s.begin():  # nothing to settle while the named job runs
        assert jobstate.settle_waiting(s) == []
    token = _at_existing(db, named, _last())
    with db() as s, s.begin():
        job = jobstate.held(s, named, token)
        assert job is not None
        released = jobstate.finish(s, job, Status.SUCCEEDED, message="done")
    assert released == [job_id]
    job = _get(db, job_id)
    assert job.status == STAGES[FIRST_STAGE].status and job.enqueued_at is None  # sent by the caller
    # A chain of two waiting jobs: cancelling the head fails both, naming the cause.
    second, head = _waiting(db)
    with db() as s, s.begin():
        third = jobstate.new_job(
            waiting=True,
            owner_id="key_1",
            teacher=f"job:{second}",
            student="s",
            dataset="d",
            spec={},
            spec_hash="y",
        )
        s.add(third)
        s.flush()
        third_id = third.id
    _cancel(db, head)
    for waiting, cause in ((second, head), (third_id, second)):
        job = _get(db, waiting)
        assert job.status == Status.FAILED and job.error_code == "dependency_failed"
        assert cause in (job.error_message or "")
