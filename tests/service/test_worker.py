"""The workers end to end: real API process, real `tvkd worker` processes, real Redis, the
database on SQLite and on PostgreSQL (the `backend` fixture), tiny models.

Tests that need "no worker running" kill the pool's workers first; pytest runs all tests of one
backend before the other (session-scoped parameter), each backend with its own worker pool.
Jobs that should share a teacher-value store use the same settings; a test that needs a store
of its own picks a distinct `value_beta` (part of the content key).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    ALICE,
    REDIS_HOST,
    REDIS_PORT,
    Proc,
    WorkerPool,
    client,
    free_port,
    start_process,
    wait_for,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, session_factory
from service.models import Artifact, Checkpoint, Job, JobEvent, MetricPoint, Precompute

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def job_body(assets: dict[str, str], **hyperparameters: Any) -> dict[str, Any]:
    hp = {"max_steps": 6, "save_every": 2, "batch_size": 4, "learning_rate": 1e-3, **hyperparameters}
    return {
        "teacher": assets["teacher"],
        "student": assets["student"],
        "dataset": assets["dataset"],
        "alpha": 0.7,
        "beta": 0.1,
        "hyperparameters": hp,
    }


def submit(api: str, assets: dict[str, str], **hyperparameters: Any) -> str:
    with client(api) as c:
        r = c.post("/v1/jobs", json=job_body(assets, **hyperparameters))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def get_job(api: str, job_id: str) -> dict[str, Any]:
    with client(api) as c:
        r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(
    api: str, job_id: str, statuses: set[str], *, timeout: float, pool: WorkerPool | None = None
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = get_job(api, job_id)
        if job["status"] in statuses:
            return job
        if job["status"] in TERMINAL:
            logs = "\n".join(p.tail(40) for p in pool.procs) if pool else ""
            pytest.fail(f"job {job_id} ended {job['status']} ({job['error']}), wanted {statuses}\n{logs}")
        return None

    try:
        return wait_for(check, timeout=timeout, interval=0.25, what=f"job {job_id} to be {statuses}")
    except pytest.fail.Exception:
        if pool:
            print("\n".join(p.tail(60) for p in pool.procs))
        raise


def events(db: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with db() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def checkpoints(db: sessionmaker[Session], job_id: str) -> list[Checkpoint]:
    with db() as s:
        return list(
            s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
        )


def train_steps(db: sessionmaker[Session], job_id: str) -> list[int]:
    """The steps that have a training loss point (one row per step, by the unique key)."""
    with db() as s:
        return list(
            s.scalars(
                select(MetricPoint.step)
                .where(MetricPoint.job_id == job_id, MetricPoint.split == "train", MetricPoint.name == "loss")
                .order_by(MetricPoint.step)
            )
        )


def messages_for(broker: redis.Redis, job_id: str, settings: Any) -> int:
    """Messages for the job waiting in this deployment's `default` queue (task ids start with the
    job id)."""
    from service.queue import queue_name

    waiting = broker.lrange(queue_name(settings, "default"), 0, -1)
    return sum(json.loads(raw)["headers"]["id"].startswith(job_id) for raw in waiting)


def no_workers(pool: WorkerPool) -> None:
    for proc in pool.procs:
        proc.kill9()


def running_workers(pool: WorkerPool, n: int) -> list[Proc]:
    """At least `n` live workers, all ready (consuming)."""
    while sum(p.alive() for p in pool.procs) < n:
        pool.start()
    alive = [p for p in pool.procs if p.alive()]
    for proc in alive:
        wait_for(lambda proc=proc: " ready." in proc.tail(400), timeout=60, what=f"{proc.name} to be ready")
    return alive


def holder(pool: WorkerPool, worker: str | None) -> Proc:
    """The worker process whose Celery hostname is `worker` (the job's lease holder)."""
    for proc in pool.procs:
        args = list(proc.popen.args)  # type: ignore[arg-type]
        prefix = args[args.index("--hostname") + 1].split("@")[0]
        if proc.alive() and worker and worker.startswith(prefix + "@"):
            return proc
    pytest.fail(f"no live worker is {worker}")


def lease_holder(db: sessionmaker[Session], job_id: str) -> str | None:
    with db() as s:
        job = s.get(Job, job_id)
        return job.worker if job is not None and job.lease_token else None


def assert_loadable_checkpoint(path: Path, student: Path) -> None:
    """The checkpoint's weights load into the student and it runs."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = load_file(path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(student)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(weights) <= set(model.state_dict()), (missing, unexpected)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# No worker running


def test_cancel_while_queued(api: str, workers: WorkerPool, tiny_assets: dict[str, str], db) -> None:
    no_workers(workers)
    job_id = submit(api, tiny_assets)
    with client(api) as c:
        r = c.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "cancelled" and job["started_at"] is None
    # Its message stays in the queue; a worker that gets it later drops it (the lease cannot be
    # taken on a finished job), as test_submit_succeeds shows for a duplicate message.
    assert not any("running on" in e.message for e in events(db, job_id))


def test_lost_message_is_requeued_after_redis_flush(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db, redis_db: int
) -> None:
    from service.queue import get_app
    from worker.dispatch import queued_job_ids
    from worker.reconciler import Reconciler

    no_workers(workers)
    settings = settings_of(workers.env)
    app = get_app(settings)
    job_id = submit(api, tiny_assets)
    assert job_id in (queued_job_ids(app, settings) or set())
    # Waiting longer than REQUEUE_AFTER behind other jobs is not "lost": the reconciler sees the
    # message in the queue and sends no duplicate.
    broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
    assert messages_for(broker, job_id, settings) == 1
    time.sleep(settings.requeue_after + 0.5)
    actions = Reconciler(app, settings).run_once()
    assert job_id not in {j for j, _ in actions} and messages_for(broker, job_id, settings) == 1
    broker.flushdb()  # the message is gone (this run's own Redis database only, never FLUSHALL)
    workers.start()
    job = wait_status(api, job_id, {"succeeded"}, timeout=60, pool=workers)
    assert job["model_path"]
    assert any("re-sent" in e.message for e in events(db, job_id))


# --------------------------------------------------------------------------------------------
# With workers


def test_submit_succeeds(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    workers.ensure_one()
    t0 = time.monotonic()
    # With the generation evaluation: the 2 held-out prompts answered before and after, scored by
    # the dataset's gold checker and a reward model under the model root.
    job_id = submit(api, tiny_assets, gen_prompts=2, gen_max_new_tokens=4, reward_model="rm")
    job = wait_status(api, job_id, {"succeeded"}, timeout=45, pool=workers)
    assert time.monotonic() - t0 < 45
    artifacts = service_home / "artifacts"
    assert job["error"] is None and job["result"]["steps"] == 6
    assert job["model_path"] == f"jobs/{job_id}/model"  # relative to the artifact root
    model = artifacts / job["model_path"]
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))

    with client(api) as c:
        metrics = c.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
        samples = c.get(f"/v1/jobs/{job_id}/samples").json()["data"]
        ckpts = c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        evs = c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        generations = c.get(f"/v1/jobs/{job_id}/generations", params={"limit": 1}).json()
        more = c.get(f"/v1/jobs/{job_id}/generations", params={"after": 0}).json()
    assert {m["split"] for m in metrics} == {"train", "eval", "teacher"}  # teacher: the teacher check
    assert train_steps(db, job_id) == [1, 2, 3, 4, 5, 6]
    assert samples and samples[0]["chosen"]["tokens"] > 0
    assert ckpts and ckpts[-1]["step"] == 6 and all((artifacts / c["path"]).is_dir() for c in ckpts)
    messages = [e["message"] for e in evs]
    for stage in ("validate", "precompute", "train", "evaluate"):
        assert any(m.startswith(f"{stage} running on") for m in messages), (stage, messages)
    # The reference pass is a step of the train stage: reported, with the job at stage train.
    reference = [e for e in evs if e["message"].startswith("reference started")]
    assert reference and reference[0]["stage"] == "train" and reference[0]["data"]["stage"] == "reference"
    # The held-out evaluation is the evaluate stage's: from the saved model, at the last step.
    scored = [e for e in evs if e["message"].startswith("evaluate started")]
    assert scored and scored[-1]["stage"] == "evaluate"
    final = [m for m in metrics if m["split"] == "eval" and m["step"] == 6]
    assert final and job["result"]["eval_metrics"]["pairs"] == job["result"]["evaluate"]["eval_pairs"] > 0
    # The answers, paged: before beside after, scored; gen/* before at step 0, after at step 6.
    assert [g["k"] for g in generations["data"] + more["data"]] == [0, 1] and generations["has_more"]
    assert generations["scorers"] == {"gold": "declared by the dataset", "reward": "rm", "teacher": None}
    for g in generations["data"] + more["data"]:
        for when in ("before", "after"):
            assert isinstance(g[when]["gold"], bool) and isinstance(g[when]["reward"], float)
    gen = {(m["step"], m["name"]): m["value"] for m in metrics if m["name"].startswith("gen/")}
    assert gen[(0, "gen/reward")] == pytest.approx(generations["before"]["gen/reward"])
    assert gen[(6, "gen/gold_accuracy")] == pytest.approx(generations["after"]["gen/gold_accuracy"])
    with db() as s:
        kinds = set(s.scalars(select(Artifact.kind).where(Artifact.job_id == job_id)))
        row = s.get(Job, job_id)
        assert row is not None and row.lease_token is None and row.progress_done == row.progress_total == 1
    assert {"model", "samples", "generations", "reference", "result"} <= kinds
    # result.json, read through the one reader: the worker writes the contract's current version.
    from tvkd.artifacts import RESULT_VERSION, read_result, read_samples

    record = read_result(artifacts / "jobs" / job_id)
    assert (record.version, record.status, record.job_id, record.steps) == (
        RESULT_VERSION,
        "completed",
        job_id,
        6,
    )
    assert record.paths.model == job["model_path"] and record.parameters and record.data["train_pairs"] > 0
    assert record.sample_count == len(read_samples(artifacts / record.paths.samples).samples) > 0

    # A stale or duplicate message (here: the validate stage again) is acknowledged and ignored.
    from service.queue import get_app, send_stage

    before = len(events(db, job_id))
    send_stage(get_app(settings_of(workers.env)), job_id, "validate")
    wait_for(
        lambda: any(f"{job_id} (validate): not taken" in p.tail(300) for p in workers.procs),
        timeout=20,
        what="the duplicate message to be dropped",
    )
    assert len(events(db, job_id)) == before and get_job(api, job_id)["status"] == "succeeded"


def settings_of(env: dict[str, str]) -> Any:
    """The settings the worker processes see."""
    from service.settings import Settings

    fields = {k[5:].lower(): v for k, v in env.items() if k.startswith("TVKD_")}
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def test_cancel_while_training_keeps_a_usable_checkpoint(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    workers.ensure_one()
    job_id = submit(api, tiny_assets, max_steps=3000, save_every=3)
    wait_for(lambda: checkpoints(db, job_id), timeout=45, what="a first checkpoint")
    with client(api) as c:
        r = c.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled"), r.text
    job = wait_status(api, job_id, {"cancelled"}, timeout=30, pool=workers)
    assert job["error"] is None
    ckpts = checkpoints(db, job_id)
    assert ckpts and ckpts[-1].step < 3000
    last = service_home / "artifacts" / ckpts[-1].path
    assert_loadable_checkpoint(last, service_home / "models" / tiny_assets["student"])
    assert any(e.message.startswith("cancelled") and "kept" in e.message for e in events(db, job_id))


def test_stages_carry_the_stored_spec_and_what_validate_prepared(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    """The spec is validated and stored at submit; validate writes prepared.json; the next stages
    load both instead of checking again (an edited split is used as written), and a dataset
    changed since validate fails the job. The job's `report_to` trackers write where the server's
    settings say (default: under the artifact root), a run per job id."""
    from tvkd.config import split_settings

    no_workers(workers)
    data = service_home / "data"
    for name in ("kept.jsonl", "changed.jsonl"):
        (data / name).write_text((data / tiny_assets["dataset"]).read_text())
    hp = {
        "max_steps": 2,
        "batch_size": 4,
        "limit": 40,
        "eval_fraction": 0.25,
        "report_to": ["tensorboard", "mlflow"],
    }
    kept = submit(api, {**tiny_assets, "dataset": "kept.jsonl"}, **hp)
    changed = submit(api, {**tiny_assets, "dataset": "changed.jsonl"}, **hp)
    with db() as s:
        row = s.get(Job, kept)
        assert row is not None
        train, options = split_settings({**job_body(tiny_assets, **hp)["hyperparameters"], "alpha": 0.7})
        assert row.spec == {"kind": "tvkd", "train": train.to_dict(), "options": dataclasses.asdict(options)}
        assert row.spec["options"]["limit"] == 40

    validator = workers.start("validator", queues="default")  # validate only
    for job_id in (kept, changed):
        wait_status(api, job_id, {"queued"}, timeout=60, pool=workers)
    validator.stop()
    prepared_path = service_home / "artifacts" / "jobs" / kept / "prepared.json"
    prepared = json.loads(prepared_path.read_text())
    assert len(prepared["train_idx"]) == 30 and len(prepared["eval_idx"]) == 10
    # Move two held-out pairs into training: a later stage uses the split as validate wrote it.
    prepared["train_idx"] += prepared["eval_idx"][:2]
    prepared["eval_idx"] = prepared["eval_idx"][2:]
    prepared_path.write_text(json.dumps(prepared))
    rows = [json.loads(line) for line in (data / "changed.jsonl").read_text().splitlines()]
    rows[0]["chosen"][-1]["content"] += " (edited)"
    (data / "changed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    workers.start()
    job = wait_status(api, kept, {"succeeded"}, timeout=90, pool=workers)
    assert (job["result"]["train"]["train_pairs"], job["result"]["train"]["eval_pairs"]) == (32, 8)
    assert_tracked(service_home / "artifacts", kept, job["result"]["train"]["metrics"])
    job = wait_status(api, changed, {"failed"}, timeout=60, pool=workers)
    assert (
        job["error"]["code"] == "data_error" and "changed since the validate stage" in job["error"]["message"]
    )


def assert_tracked(artifacts: Path, job_id: str, last: dict[str, float]) -> None:
    """TensorBoard events in <artifacts>/tensorboard/<job id> and a finished MLflow run named by the
    job id in the file store TVKD_HOME/mlruns, both ending with the job's last metrics."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tvkd.trackers import _mlflow_uri

    tb = EventAccumulator(str(artifacts / "tensorboard" / job_id))
    tb.Reload()
    assert [(p.step, p.value) for p in tb.Scalars("train/loss")][-1] == (
        2,
        pytest.approx(last["loss"], rel=1e-6),
    )
    mlflow = MlflowClient(tracking_uri=_mlflow_uri(str(artifacts.parent / "mlruns")))
    experiment = mlflow.get_experiment_by_name("tvkd")
    (run,) = mlflow.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{job_id}'")
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == "2"
    assert run.data.metrics["rewards/accuracies"] == pytest.approx(last["rewards/accuracies"], rel=1e-6)
    assert run.data.tags["model_dir"] == str(artifacts / "jobs" / job_id / "model")


def test_bad_rows_fail_validation_naming_the_rows(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db, service_home: Path
) -> None:
    workers.ensure_one()
    rows = [{"prompt": f"question {i}?", "chosen": "yes", "rejected": "no"} for i in range(8)]
    rows[3] = {"prompt": "no rejected answer", "chosen": "yes"}
    rows[5]["chosen"] = " "
    (service_home / "data" / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job_id = submit(api, {**tiny_assets, "dataset": "bad.jsonl"}, on_error="raise")
    job = wait_status(api, job_id, {"failed"}, timeout=40, pool=workers)
    assert job["error"]["code"] == "validation_error" and "row 3" in job["error"]["message"]
    named = [e for e in events(db, job_id) if e.level == "error" and "rows" in (e.data or {})]
    assert named and named[0].data["rows"] == [3, 5]
    assert any("traceback" in (e.data or {}) for e in events(db, job_id))


def test_two_jobs_with_one_key_precompute_once(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db
) -> None:
    # Two ready workers before the jobs arrive: each takes one, so the two precomputes overlap
    # and the store's lock (not the queue's order) is what makes the key computed once.
    running_workers(workers, 2)
    options = {"value_beta": 1.37, "max_steps": 2}  # a content key no other test uses
    jobs = [submit(api, tiny_assets, **options), submit(api, tiny_assets, **options)]
    for job_id in jobs:
        wait_status(api, job_id, {"succeeded"}, timeout=60, pool=workers)
    with db() as s:
        keys = {s.get(Job, j).precompute_key for j in jobs}  # type: ignore[union-attr]
        assert len(keys) == 1 and None not in keys
        rows = list(s.scalars(select(Precompute).where(Precompute.key.in_(keys))))
    assert len(rows) == 1 and rows[0].status == "complete" and rows[0].job_id in jobs
    reports = {j: [e.data for e in events(db, j) if "computed_by" in (e.data or {})] for j in jobs}
    cached = {j: r[0]["cached"] for j, r in reports.items()}
    computer = rows[0].job_id
    assert cached[computer] is False
    other = next(j for j in jobs if j != computer)
    assert cached[other] is True and reports[other][0]["computed_by"] == computer


def test_kill9_while_training_resumes_from_checkpoint(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db
) -> None:
    running_workers(workers, 2)  # the survivor's reconciler finds the dead job and resumes it
    total = 120
    job_id = submit(api, tiny_assets, max_steps=total, save_every=4)
    wait_for(lambda: checkpoints(db, job_id), timeout=60, what="a first checkpoint")
    holder(workers, lease_holder(db, job_id)).kill9()
    killed_at = max(train_steps(db, job_id))
    assert get_job(api, job_id)["status"] == "training" and killed_at < total

    job = wait_status(api, job_id, {"succeeded"}, timeout=90, pool=workers)
    assert job["result"]["steps"] == total
    evs = events(db, job_id)
    resumed = [e for e in evs if e.message.startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].data["step"] >= 4, [e.message for e in evs]
    starts = [e.data.get("start_step") for e in evs if e.message.startswith("train started")]
    assert starts == [0, resumed[0].data["step"]]  # the step counter continues, not from 0
    assert any("stopped beating" in e.message for e in evs)
    # Nothing duplicated: one loss point per step 1..total, one model, one value store.
    assert train_steps(db, job_id) == list(range(1, total + 1))
    with db() as s:
        key = s.get(Job, job_id).precompute_key  # type: ignore[union-attr]
        assert s.scalar(select(func.count()).select_from(Precompute).where(Precompute.key == key)) == 1
        models = s.scalar(
            select(func.count())
            .select_from(Artifact)
            .where(Artifact.job_id == job_id, Artifact.kind == "model")
        )
        assert models == 1


def test_worker_shutdown_hands_the_job_back(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db
) -> None:
    running_workers(workers, 2)
    total = 120
    job_id = submit(api, tiny_assets, max_steps=total, save_every=5)
    wait_for(lambda: checkpoints(db, job_id), timeout=60, what="a first checkpoint")
    leaving = holder(workers, lease_holder(db, job_id))
    leaving.stop()  # SIGTERM: warm shutdown; the other worker takes the job
    assert leaving.popen.returncode == 0, leaving.tail()
    assert any("shutting down" in e.message for e in events(db, job_id))
    job = wait_status(api, job_id, {"succeeded"}, timeout=60, pool=workers)
    assert job["result"]["steps"] == total and train_steps(db, job_id) == list(range(1, total + 1))
    resumed = [e for e in events(db, job_id) if e.message.startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].data["step"] > 0


def test_a_worker_that_lost_its_lease_stops_without_writing(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], db
) -> None:
    from sqlalchemy import update

    running_workers(workers, 1)
    total = 120
    job_id = submit(api, tiny_assets, max_steps=total, save_every=5)
    wait_for(lambda: checkpoints(db, job_id), timeout=60, what="a first checkpoint")
    worker = holder(workers, lease_holder(db, job_id))
    with db() as s, s.begin():  # as if another worker had taken the job over
        s.execute(update(Job).where(Job.id == job_id).values(lease_token="taken-over"))
    wait_for(lambda: f"job {job_id}: lease lost" in worker.tail(300), timeout=20, what="the worker to stop")
    evs = events(db, job_id)
    assert not any(e.message.startswith(("cancelled", "worker")) for e in evs)
    assert get_job(api, job_id)["status"] == "training"
    # The "other worker" never beats: the reconciler re-enqueues the job, which then completes.
    job = wait_status(api, job_id, {"succeeded"}, timeout=60, pool=workers)
    assert job["result"]["steps"] == total and train_steps(db, job_id) == list(range(1, total + 1))


# --------------------------------------------------------------------------------------------
# The embedded broker (no Redis at all): one run is enough, on the embedded SQLite database.


def test_embedded_broker_runs_a_job(tmp_path: Path) -> None:
    """Independent of the `backend` parameter (it uses neither Redis nor the run's database), so
    it runs exactly once per test run."""
    import os

    from tvkd.model_prep import build_tiny_model
    from tvkd.tasks import generate, split, write_jsonl

    home = tmp_path / "home"
    build_tiny_model(home / "models" / "teacher", seed=1)
    build_tiny_model(home / "models" / "student", seed=2)
    train, held_out = split(generate(48, seed=0), eval_count=8)
    write_jsonl(train + held_out, home / "data" / "tasks.jsonl")
    assets = {"teacher": "teacher", "student": "student", "dataset": "tasks.jsonl"}
    # Embedded defaults: no database, broker, artifact or root settings; everything under TVKD_HOME.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
    env.update(
        TVKD_HOME=str(home), TVKD_API_KEYS=f"alice={ALICE}", TVKD_HEARTBEAT_SECONDS="0.5",
        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
    )  # fmt: skip
    port = free_port()
    api = start_process("api-embedded", ["serve", "--port", str(port), "--no-access-log"], env, tmp_path)
    worker = start_process("worker-embedded", ["worker", "--hostname", "fs@%h"], env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        api.wait_answering(f"{url}/healthz")
        job_id = submit(url, assets)
        try:
            wait_for(
                lambda: get_job(url, job_id)["status"] in TERMINAL,
                timeout=60,
                what="the embedded job to finish",
            )
        finally:
            print(worker.tail(80))
        job = get_job(url, job_id)
        assert job["status"] == "succeeded", job
        assert (home / "artifacts" / job["model_path"] / "config.json").is_file()
        assert (home / "broker" / "processed").is_dir() and list((home / "broker" / "processed").iterdir())
    finally:
        worker.stop()
        api.stop()


# --------------------------------------------------------------------------------------------
# Units (no services)


def test_oom_retry_halves_the_micro_batch_keeping_the_effective_batch() -> None:
    import torch

    from worker.oom import retry_on_oom, smaller_batch

    assert smaller_batch(8, 1) == (4, 2)
    assert smaller_batch(6, 2) == (3, 4)
    assert smaller_batch(5, 1) == (1, 5)
    assert smaller_batch(1, 4) is None
    calls, retries = [], []

    def run(batch_size: int, grad_accum: int) -> str:
        calls.append((batch_size, grad_accum))
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    result = retry_on_oom(run, 8, 1, on_retry=lambda *a: retries.append(a[1:3]), sleep=lambda s: None)
    assert result == "done" and calls == [(8, 1), (4, 2), (2, 4)]
    assert retries == [((8, 1), (4, 2)), ((4, 2), (2, 4))]

    with pytest.raises(torch.OutOfMemoryError):  # gives up after `retries`
        retry_on_oom(run, 64, 1, on_retry=lambda *a: None, retries=2, sleep=lambda s: None)
    with pytest.raises(ValueError):  # other errors are not retried
        retry_on_oom(lambda b, g: (_ for _ in ()).throw(ValueError("x")), 8, 1, on_retry=lambda *a: None)


def test_error_codes() -> None:
    from tvkd.config import ConfigError
    from tvkd.data import DataError, DataReport
    from tvkd.models import ModelError
    from worker.tasks import classify

    report = DataReport("d.jsonl", 3, 0, 3)
    assert classify(DataError(report), "validate") == "validation_error"
    assert classify(DataError(report), "train") == "data_error"
    assert classify(ConfigError("shaping", "x"), "validate") == "validation_error"
    assert classify(ModelError("x"), "precompute") == "model_error"
    assert classify(RuntimeError("CUDA out of memory"), "train") == "out_of_memory"
    assert classify(KeyError("x"), "train") == "internal_error"


def test_a_lost_lease_stops_the_stage_before_a_checkpoint(tmp_path: Path) -> None:
    """The flush before a checkpoint would drop the buffered points of a worker whose lease is
    gone; the checkpoint after it would let the new holder resume past them (a gap in the curve).
    So the reporter stops the stage there instead. No database is touched on that path."""
    from worker.reporting import JobReporter, LeaseLost, StopFlags

    flags = StopFlags()
    reporter = JobReporter(
        None,  # type: ignore[arg-type]  # no database: this path must not need one
        "job_x",
        "token",
        "train",
        flags,
        artifact_root=tmp_path,
        checkpoint_every=5,
        flush_seconds=1e9,  # no time-based flush: the buffered points stay buffered
    )
    reporter.on_metrics(4, {"loss": 0.5}, "train")  # buffered, not yet written
    flags.lease_lost = True
    reporter.on_progress("train", 4, 100, None)  # not a checkpoint step: nothing to protect
    with pytest.raises(LeaseLost):
        reporter.on_progress("train", 5, 100, None)
