"""One job's teacher precompute shared by two real `tvkd worker` processes (worker/fanout.py):
the stage task and a shard task on the precompute queue each compute shards of the job's store,
which equals a one-process store bit for bit; a worker killed with SIGKILL mid-precompute leaves
its finished shards, and the resumed job keeps them.

The workers here split a store of 16 shards (160 pairs, 10 a shard) two ways; the teacher is
wider than the other tests' (hidden 256, 4 layers) so that the precompute lasts a few seconds on
one CPU thread and both workers get to it. The session's other workers are stopped first (they
would take the job with the default, one-task settings).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WorkerPool, client, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_worker import events, get_job, holder, lease_holder, no_workers, wait_status

from service.db import make_engine, session_factory
from service.models import Job, Precompute
from tvkd.config import PrecomputeConfig
from tvkd.data import load_pairs
from tvkd.precompute import precompute_values
from tvkd.ragged import RaggedFile
from tvkd.store import MANIFEST, ValueStore
from tvkd.store_compare import store_differences

PAIRS, SHARD_SIZE, PARTS = 160, 10, 2


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def fanout_assets(service_home: Path, tiny_assets: dict[str, str]) -> dict[str, str]:
    from tvkd.model_prep import build_tiny_model
    from tvkd.tasks import generate, write_jsonl

    build_tiny_model(
        service_home / "models" / "teacher-wide",
        seed=4,
        hidden_size=256,
        num_layers=4,
        intermediate_size=1024,
    )
    write_jsonl(generate(PAIRS, seed=5), service_home / "data" / "fanout.jsonl")
    return {"teacher": "teacher-wide", "student": tiny_assets["student"], "dataset": "fanout.jsonl"}


@pytest.fixture
def fanout_pool(workers: WorkerPool, service_env: dict[str, str], service_home: Path) -> Iterator[WorkerPool]:
    """Two ready workers that split a precompute PARTS ways (and no other worker)."""
    no_workers(workers)
    env = {
        **service_env,
        "TVKD_PRECOMPUTE_SHARD_TASKS": str(PARTS),
        "TVKD_PRECOMPUTE_SHARD_SIZE": str(SHARD_SIZE),
    }
    pool = WorkerPool(env, service_home)
    for name in ("fan-a", "fan-b"):
        pool.start(name)
    for proc in pool.procs:
        wait_for(lambda proc=proc: " ready." in proc.tail(400), timeout=60, what=f"{proc.name} to be ready")
    yield pool
    pool.stop_all()


def _submit(api: str, assets: dict[str, str], value_beta: float) -> str:
    body = {
        **{k: assets[k] for k in ("teacher", "student", "dataset")},
        "alpha": 0.7,
        "beta": 0.1,
        "hyperparameters": {"max_steps": 2, "batch_size": 4, "value_beta": value_beta},
    }
    with client(api) as c:
        r = c.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _key(db: sessionmaker[Session], job_id: str) -> str | None:
    with db() as s:
        job = s.get(Job, job_id)
        return job.precompute_key if job else None


def _one_process_store(home: Path, tmp_path: Path, store: ValueStore) -> ValueStore:
    """The same store computed by precompute_values in this process (the key must come out equal)."""
    f = store.fields
    config = PrecomputeConfig(
        q_source=f["q_source"], value_beta=f["value_beta"], topk=f["topk"], token_stats=f["token_stats"],
        max_length=f["max_length"], bf16=f["precision"] == "bf16", shard_size=SHARD_SIZE,
        truncation_mode=f.get("truncation_mode", "none"),
    )  # fmt: skip
    pairs, _ = load_pairs(home / "data" / "fanout.jsonl")
    one = precompute_values(str(home / "models" / "teacher-wide"), pairs, config, store_root=tmp_path)
    assert one.key == store.key and not one.cached
    return one.store


def _made_by(store: ValueStore) -> list[dict[str, Any]]:
    return store.manifest["timings"]["shards"]


def test_one_jobs_precompute_is_shared_by_two_workers(
    api: str, fanout_pool: WorkerPool, fanout_assets: dict[str, str], db, service_home: Path, tmp_path: Path
) -> None:
    job_id = _submit(api, fanout_assets, value_beta=1.91)  # a content key no other test uses
    job = wait_status(api, job_id, {"succeeded"}, timeout=240, pool=fanout_pool)
    store = ValueStore.open(service_home / "artifacts" / "values" / _key(db, job_id))  # type: ignore[operator]
    made_by = _made_by(store)
    assert len(made_by) == PAIRS // SHARD_SIZE
    workers = {m["worker"] for m in made_by}
    pids = {m["pid"] for m in made_by}
    assert len(workers) == 2 and len(pids) == 2, made_by  # both workers computed shards of the one job
    assert {m["part"] for m in made_by} == {0, 1}  # the stage's task (part 0) and the shard task
    assert all(m["job"] == job_id for m in made_by)
    msgs = [e.message for e in events(db, job_id)]
    assert any(m.startswith(f"precompute split into {PARTS} tasks") for m in msgs), msgs
    assert any(m.startswith(f"shard task 1/{PARTS} on ") and " computed " in m for m in msgs), msgs
    report = job["result"]["precompute"]
    assert report["cached"] is False and report["parts"] == PARTS
    assert sum(report["shards_by_worker"].values()) == PAIRS // SHARD_SIZE
    with db() as s:
        row = s.scalar(select(Precompute).where(Precompute.key == store.key))
        assert row is not None and row.status == "complete" and row.job_id == job_id
    assert store_differences(_one_process_store(service_home, tmp_path, store), store) == []


def test_a_worker_killed_mid_precompute_leaves_shards_that_are_reused(
    api: str, fanout_pool: WorkerPool, fanout_assets: dict[str, str], db, service_home: Path, tmp_path: Path
) -> None:
    job_id = _submit(api, fanout_assets, value_beta=1.93)
    key = wait_for(lambda: _key(db, job_id), timeout=120, what="the precompute key")
    folder = service_home / "artifacts" / "values" / key
    victim = wait_for(lambda: lease_holder(db, job_id), timeout=60, what="the stage task's worker")

    def victims_shards() -> dict[str, int]:
        """Shard files the lease holder's worker wrote so far (name → inode)."""
        out = {}
        for p in folder.glob("shard-*.safetensors"):
            try:
                if RaggedFile(p).meta_json("made_by")["worker"] == victim:  # type: ignore[index]
                    out[p.name] = p.stat().st_ino
            except (OSError, ValueError, KeyError):
                continue
        return out

    wait_for(lambda: len(victims_shards()) >= 2, timeout=120, interval=0.05, what="two shards by the holder")
    holder(fanout_pool, victim).kill9()
    kept = victims_shards()
    assert not (folder / MANIFEST).exists() and get_job(api, job_id)["status"] == "precomputing"

    wait_status(api, job_id, {"succeeded"}, timeout=240, pool=fanout_pool)
    msgs = [e.message for e in events(db, job_id)]
    assert any("stopped beating" in m for m in msgs), msgs
    store = ValueStore.open(folder)
    assert {name: (folder / name).stat().st_ino for name in kept} == kept  # not rewritten
    by_file = {entry["file"]: m for entry, m in zip(store.manifest["shards"], _made_by(store), strict=True)}
    assert all(by_file[name]["worker"] == victim for name in kept)  # the dead worker's shards, reused
    assert store_differences(_one_process_store(service_home, tmp_path, store), store) == []


def _shards_by(folder: Path) -> dict[str, str]:
    """Shard files written so far → the worker that wrote each."""
    out = {}
    for p in folder.glob("shard-*.safetensors"):
        try:
            out[p.name] = RaggedFile(p).meta_json("made_by")["worker"]  # type: ignore[index]
        except (OSError, ValueError, KeyError):
            continue
    return out


def test_cancel_stops_the_stage_task_and_the_shard_task(
    api: str, fanout_pool: WorkerPool, fanout_assets: dict[str, str], db, service_home: Path
) -> None:
    job_id = _submit(api, fanout_assets, value_beta=1.97)
    key = wait_for(lambda: _key(db, job_id), timeout=120, what="the precompute key")
    folder = service_home / "artifacts" / "values" / key
    holder_worker = wait_for(lambda: lease_holder(db, job_id), timeout=60, what="the stage task's worker")
    # Both tasks at work: a shard by the stage task's worker and one by the other worker.
    both = wait_for(
        lambda: len(set(_shards_by(folder).values())) == 2,
        timeout=120,
        interval=0.05,
        what="shards by both workers",
    )
    assert both and holder_worker in _shards_by(folder).values()
    with client(api) as c:
        r = c.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    wait_status(api, job_id, {"cancelled"}, timeout=60, pool=fanout_pool)
    # The shard task reads the job every 2 s and stops at its next batch: nothing is written
    # a few seconds later, and the store is left incomplete (a later job resumes it).
    time.sleep(4)
    written = sorted(_shards_by(folder))
    time.sleep(4)
    assert sorted(_shards_by(folder)) == written and len(written) < PAIRS // SHARD_SIZE
    assert not (folder / MANIFEST).exists()
    assert all(p.alive() for p in fanout_pool.procs)  # stopped, not crashed


def test_a_failing_shard_task_fails_the_stage_with_its_error(
    api: str, fanout_pool: WorkerPool, fanout_assets: dict[str, str], db, service_home: Path
) -> None:
    """A teacher whose embedding of '~' is NaN, and '~' in row 15 only (shard 1: the shard task's
    first shard; the head check on row 0 passes): the shard task fails and says so, the stage
    task then computes shard 1 itself and fails the job with the same error, as one task would."""
    import json

    from safetensors.torch import load_file, save_file

    from tvkd.models import load_tokenizer

    models, data = service_home / "models", service_home / "data"
    poisoned = models / "teacher-wide-nan"
    shutil.rmtree(poisoned, ignore_errors=True)
    shutil.copytree(models / "teacher-wide", poisoned)
    rows = [json.loads(line) for line in (data / "fanout.jsonl").read_text().splitlines()]
    tok = load_tokenizer(str(poisoned))

    def ids(row: dict[str, Any]) -> set[int]:  # conversational rows: lists of messages
        return {
            i
            for f in ("prompt", "chosen", "rejected")
            for m in row[f]
            for i in tok(m["content"])["input_ids"]
        }

    elsewhere = {i for r in rows for i in ids(r)}
    rows[15]["chosen"][-1]["content"] += " ~"
    only_here = ids(rows[15]) - elsewhere
    assert only_here, "no token of ' ~' is unique to row 15"
    (data / "fanout-tilde.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = load_file(poisoned / "model.safetensors")
    weights["model.embed_tokens.weight"][sorted(only_here)] = float("nan")
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    assets = {**fanout_assets, "teacher": "teacher-wide-nan", "dataset": "fanout-tilde.jsonl"}
    job_id = _submit(api, assets, value_beta=1.99)
    job = wait_status(api, job_id, {"failed"}, timeout=240, pool=fanout_pool)
    assert job["error"]["code"] == "nonfinite_teacher", job["error"]
    assert "(row 15)" in job["error"]["message"], job["error"]
    msgs = [e.message for e in events(db, job_id)]
    assert any(m.startswith("shard task 1/2 on ") and "failed (NonFiniteError" in m for m in msgs), msgs
    key = _key(db, job_id)
    assert not (service_home / "artifacts" / "values" / str(key) / "shard-00001.safetensors").exists()
    with db() as s:
        row = s.scalar(select(Precompute).where(Precompute.key == key))
        assert row is not None and row.status == "failed"


def test_shard_tasks_go_to_the_precompute_queue_and_k_follows_the_settings() -> None:
    from service.queue import queue_name
    from service.settings import Settings
    from service.statemachine import STAGES
    from worker.celery_app import create_app
    from worker.fanout import HELPERS, parts_for

    redis = "redis://127.0.0.1:6379/0"
    settings = Settings(_env_file=None, broker_url=redis, precompute_shard_tasks=4, precompute_shard_size=10)  # type: ignore[call-arg]
    app = create_app(settings)
    (helper,) = STAGES["precompute"].helpers
    assert helper in app.tasks and helper in HELPERS
    assert app.conf.task_routes[helper]["queue"] == queue_name(settings, "precompute")
    assert [parts_for(settings, n) for n in (1, 10, 11, 35, 1000)] == [1, 1, 2, 4, 4]  # min(4, shards)
    one = Settings(_env_file=None, precompute_shard_tasks=1, precompute_shard_size=10)  # type: ignore[call-arg]
    assert parts_for(one, 1000) == 1
