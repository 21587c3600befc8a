"""Job kinds and chains through the real API and real workers: the paper's pipeline (teacher SFT →
teacher DPO → student SFT → distillation) as four submissions naming each other's models
(`job:<id>`), and how a failure or a cancel travels down a chain."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import BOB, WorkerPool, client, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}
FAST = {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3}


def post(api: str, body: dict[str, Any], key: str | None = None) -> Any:
    with client(api, *([key] if key else [])) as c:
        return c.post("/v1/jobs", json=body)


def create(api: str, body: dict[str, Any]) -> dict[str, Any]:
    r = post(api, body)
    assert r.status_code == 201, r.text
    return r.json()


def job(api: str, job_id: str) -> dict[str, Any]:
    with client(api) as c:
        r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def settled(api: str, job_id: str, timeout: float, pool: WorkerPool | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        j = job(api, job_id)
        return j if j["status"] in TERMINAL else None

    try:
        return wait_for(check, timeout=timeout, what=f"job {job_id} to finish")
    except pytest.fail.Exception:
        if pool:
            print("\n".join(p.tail(60) for p in pool.procs))
        raise


def error_of(response: Any) -> tuple[int, str, str]:
    err = response.json()["error"]
    return response.status_code, err["field"], err["code"]


def test_the_paper_pipeline_is_four_chained_jobs(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], service_home: Any
) -> None:
    data = tiny_assets["dataset"]
    workers.ensure_one()
    t0 = time.monotonic()
    # All four at once: the later ones wait for the models they name.
    teacher_sft = create(
        api, {"kind": "sft", "student": tiny_assets["teacher"], "dataset": data, "hyperparameters": FAST}
    )
    teacher_dpo = create(
        api, {"kind": "dpo", "student": f"job:{teacher_sft['id']}", "dataset": data, "hyperparameters": FAST}
    )
    student_sft = create(
        api, {"kind": "sft", "student": tiny_assets["student"], "dataset": data, "hyperparameters": FAST}
    )
    distill = create(
        api,
        {
            "teacher": f"job:{teacher_dpo['id']}",
            "student": f"job:{student_sft['id']}",
            "dataset": data,
            "alpha": 0.7,
            "hyperparameters": FAST,
        },
    )
    # The teacher's implicit reward as its values (MATH.md): the DPO teacher against its SFT start.
    implicit = create(
        api,
        {
            "teacher": f"job:{teacher_dpo['id']}",
            "student": f"job:{student_sft['id']}",
            "dataset": data,
            "alpha": 0.7,
            "hyperparameters": {
                **FAST,
                "q_source": "implicit",
                "value_beta": 0.1,
                "teacher_reference": f"job:{teacher_sft['id']}",
            },
        },
    )
    assert implicit["depends_on"] == {
        "teacher": teacher_dpo["id"],
        "student": student_sft["id"],
        "teacher_reference": teacher_sft["id"],
    }
    assert teacher_sft["kind"] == "sft" and teacher_sft["teacher"] is None and teacher_sft["alpha"] is None
    assert teacher_sft["depends_on"] == {} and teacher_sft["hyperparameters"]["learning_rate"] == 1e-3
    assert "value_beta" not in teacher_sft["hyperparameters"]  # SFT settings only
    assert teacher_dpo["kind"] == "dpo" and teacher_dpo["alpha"] == 0.0
    assert teacher_dpo["status"] == "waiting" and teacher_dpo["depends_on"] == {"student": teacher_sft["id"]}
    assert distill["status"] == "waiting"
    assert distill["depends_on"] == {"teacher": teacher_dpo["id"], "student": student_sft["id"]}

    done = settled(api, distill["id"], timeout=90, pool=workers)
    seconds = time.monotonic() - t0
    assert done["status"] == "succeeded", done["error"]
    end = settled(api, implicit["id"], timeout=60, pool=workers)
    assert end["status"] == "succeeded", end["error"]
    assert end["hyperparameters"]["teacher_reference"] == f"job:{teacher_sft['id']}"
    results = {
        name: job(api, j["id"])
        for name, j in (
            ("teacher_sft", teacher_sft),
            ("teacher_dpo", teacher_dpo),
            ("student_sft", student_sft),
        )
    }
    for name, j in results.items():
        assert j["status"] == "succeeded" and j["model_path"], (name, j["error"])
    # Each job ran its kind's path: no teacher pass for sft and dpo, a teacher pass for tvkd.
    with client(api) as c:
        for j, stages in (
            (teacher_sft, {"validate", "train", "evaluate"}),
            (teacher_dpo, {"validate", "train", "evaluate"}),
            (distill, {"validate", "precompute", "train", "evaluate"}),
        ):
            evs = [
                e["message"]
                for e in c.get(f"/v1/jobs/{j['id']}/events", params={"limit": 1000}).json()["data"]
            ]
            ran = {m.split(" running on")[0] for m in evs if " running on" in m}
            assert ran == stages, (j["kind"], evs)
        evs = [e["message"] for e in c.get(f"/v1/jobs/{distill['id']}/events").json()["data"]]
    assert any(m.startswith("waiting for the teacher job") for m in evs)
    assert any("succeeded: the job starts" in m for m in evs)
    # The SFT jobs report the mean NLL; the distillation trained from the chained models.
    assert results["teacher_sft"]["result"]["metrics"]["loss"] > 0
    assert "rewards/accuracies" in results["teacher_dpo"]["result"]["metrics"]
    from tvkd.artifacts import read_result

    record = read_result(service_home / "artifacts" / "jobs" / distill["id"])
    assert record.spec["teacher"] == f"job:{teacher_dpo['id']}" and record.spec["kind"] == "tvkd"
    print(f"five chained jobs in {seconds:.1f}s")


def test_failures_and_cancels_travel_down_a_chain(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], service_home: Any
) -> None:
    data = tiny_assets["dataset"]
    bad = service_home / "data" / "bad-sft.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": "y", "completion": ""}\n')  # no usable row
    for proc in workers.procs:  # the chain is submitted before any worker can fail its head
        proc.kill9()
    first = create(
        api, {"kind": "sft", "student": tiny_assets["student"], "dataset": bad.name, "hyperparameters": FAST}
    )
    second = create(
        api, {"kind": "dpo", "student": f"job:{first['id']}", "dataset": data, "hyperparameters": FAST}
    )
    third = create(
        api,
        {
            "teacher": f"job:{second['id']}",
            "student": tiny_assets["student"],
            "dataset": data,
            "hyperparameters": FAST,
        },
    )
    assert second["status"] == third["status"] == "waiting"
    workers.ensure_one()
    assert settled(api, first["id"], timeout=60, pool=workers)["status"] == "failed"
    for j, named in ((second, first), (third, second)):
        end = settled(api, j["id"], timeout=10)
        assert end["status"] == "failed" and end["error"]["code"] == "dependency_failed"
        assert named["id"] in end["error"]["message"]

    # A chain cannot start from a failed job, an unknown one, or another key's.
    r = post(api, {"kind": "dpo", "student": f"job:{first['id']}", "dataset": data})
    assert error_of(r) == (422, "student", "dependency_failed")
    r = post(api, {"teacher": "job:job_" + "0" * 24, "student": tiny_assets["student"], "dataset": data})
    assert error_of(r) == (422, "teacher", "unknown_job")
    r = post(api, {"kind": "dpo", "student": f"job:{first['id']}", "dataset": data}, key=BOB)
    assert error_of(r) == (422, "student", "unknown_job")
    r = post(api, {"kind": "dpo", "student": "job:nonsense", "dataset": data})
    assert error_of(r) == (422, "student", "unknown_job")

    # Cancelling a job that others wait for fails them at once (no worker needed).
    head = create(
        api,
        {
            "kind": "sft",
            "student": tiny_assets["student"],
            "dataset": data,
            "hyperparameters": {**FAST, "max_steps": 200},
        },
    )
    tail = create(api, {"kind": "dpo", "student": f"job:{head['id']}", "dataset": data})
    with client(api) as c:
        assert c.post(f"/v1/jobs/{head['id']}/cancel").status_code == 200
    settled(api, head["id"], timeout=60)
    end = job(api, tail["id"])
    assert end["status"] == "failed" and end["error"]["code"] == "dependency_failed"
    assert "cancelled" in end["error"]["message"]


def test_kinds_check_their_settings(api: str, tiny_assets: dict[str, str]) -> None:
    base = {"student": tiny_assets["student"], "dataset": tiny_assets["dataset"]}
    cases = [
        ({**base, "kind": "dpo", "alpha": 0.5}, "alpha", "invalid_value"),
        ({**base, "kind": "dpo", "teacher": tiny_assets["teacher"]}, "teacher", "invalid_value"),
        ({**base, "kind": "sft", "alpha": 0.0}, "alpha", "invalid_value"),
        (
            {**base, "kind": "sft", "hyperparameters": {"value_beta": 2.0}},
            "hyperparameters.value_beta",
            "invalid_value",
        ),
        (
            {**base, "kind": "sft", "hyperparameters": {"precompute_bf16": True}},
            "hyperparameters.precompute_bf16",
            "invalid_value",
        ),
        ({**base}, "teacher", "missing_field"),
        ({**base, "kind": "ppo"}, "kind", None),
        (
            {
                **base,
                "teacher": tiny_assets["teacher"],
                "hyperparameters": {"teacher_reference": "job:job_" + "0" * 24},
            },
            "hyperparameters.teacher_reference",
            "unknown_job",
        ),
        (
            {
                **base,
                "teacher": tiny_assets["teacher"],
                "hyperparameters": {"teacher_reference": "no-such-model"},
            },
            "hyperparameters.teacher_reference",
            "invalid_model",
        ),
    ]
    for body, field, code in cases:
        r = post(api, body)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
        if code:
            assert r.json()["error"]["code"] == code, (body, r.text)


def test_the_reconciler_never_sends_a_waiting_job_and_releases_one_the_trigger_missed(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], database_url: str, redis_db: int
) -> None:
    """A reference that succeeds between a submit's check and its commit is not seen by the
    trigger at its completion; the reconciler's pass releases the waiting job then."""
    import json

    import redis
    from conftest import REDIS_HOST, REDIS_PORT
    from sqlalchemy import update

    from service.db import make_engine, session_factory
    from service.models import Job
    from service.queue import get_app, queue_name
    from service.settings import Settings
    from worker.reconciler import Reconciler

    for proc in workers.procs:
        proc.kill9()
    fields = {k[5:].lower(): v for k, v in workers.env.items() if k.startswith("TVKD_")}
    settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
    data = tiny_assets["dataset"]
    head = create(api, {"kind": "sft", "student": tiny_assets["student"], "dataset": data})
    tail = create(api, {"kind": "dpo", "student": f"job:{head['id']}", "dataset": data})
    broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)

    def sent(job_id: str) -> int:
        waiting = broker.lrange(queue_name(settings, "default"), 0, -1)  # this deployment's queue
        return sum(json.loads(m)["headers"]["id"].startswith(job_id) for m in waiting)

    time.sleep(settings.requeue_after + 0.5)  # old enough to count as "never sent" if it were not waiting
    reconciler = Reconciler(get_app(settings), settings)
    assert tail["id"] not in {j for j, _ in reconciler.run_once()} and sent(tail["id"]) == 0
    assert job(api, tail["id"])["status"] == "waiting"
    engine = make_engine(database_url)
    try:
        with session_factory(engine)() as s, s.begin():  # the head succeeds without its trigger
            s.execute(update(Job).where(Job.id == head["id"]).values(status="succeeded", stage="evaluate"))
    finally:
        engine.dispose()
    assert (tail["id"], "released") in reconciler.run_once()
    assert job(api, tail["id"])["status"] == "validating" and sent(tail["id"]) == 1
    with client(api) as c:
        c.post(f"/v1/jobs/{tail['id']}/cancel")
