"""MATH.md's value sources and options through the service: `q_source="implicit"` with
`hyperparameters.teacher_reference`, `terminal="pre_eos"` and `sft_weight` in a real job (real API
process, real worker, both database backends), their metrics and the teacher check; and
/v1/inspect with a teacher reference. The tiny teacher and student of `tiny_assets` share a
tokenizer, so the student folder serves as the teacher's reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
from conftest import WorkerPool, client, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


def test_a_job_with_implicit_values_pre_eos_and_sft_weight(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str]
) -> None:
    workers.ensure_one()
    hp = {
        "q_source": "implicit",
        "teacher_reference": tiny_assets["student"],
        "terminal": "pre_eos",
        "sft_weight": 0.5,
        "value_beta": 0.37,  # a value store of this test's own (β_v is part of the key)
        "max_steps": 2,
        "batch_size": 4,
        "num_samples": 1,
    }
    body = {k: tiny_assets[k] for k in ("teacher", "student", "dataset")} | {"hyperparameters": hp}
    with client(api) as c:
        # Without its reference, the implicit source is refused at submit, naming the field.
        bad = c.post("/v1/jobs", json={**body, "hyperparameters": {**hp, "teacher_reference": None}})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "hyperparameters.teacher_reference"
        outside = c.post("/v1/jobs", json={**body, "hyperparameters": {**hp, "teacher_reference": "/etc"}})
        assert outside.status_code == 422
        assert outside.json()["error"]["field"] == "hyperparameters.teacher_reference"
        created = c.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert created.json()["hyperparameters"]["teacher_reference"] == tiny_assets["student"]

        def finished() -> dict[str, Any] | None:
            job = c.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in TERMINAL else None

        job = wait_for(finished, timeout=120, what=f"job {job_id} to finish")
        assert job["status"] == "succeeded", (job["error"], "\n".join(p.tail(60) for p in workers.procs))
        metrics = c.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
        evs = c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        stores = c.get("/v1/precomputes").json()["data"]

    by = {(m["split"], m["name"]) for m in metrics}
    for name in ("nll/chosen", "tvkd/offset", "tvkd/gradient_scale", "tvkd/shaping_accuracy"):
        assert ("train", name) in by and ("eval", name) in by, name
    teacher = {m["name"]: m for m in metrics if m["split"] == "teacher"}
    accuracy = teacher["teacher/shaping_accuracy"]
    assert accuracy["step"] == 0 and 0.0 <= accuracy["value"] <= 1.0
    low, high = (
        teacher["teacher/shaping_accuracy_low"]["value"],
        teacher["teacher/shaping_accuracy_high"]["value"],
    )
    assert low <= accuracy["value"] <= high
    check = [e for e in evs if "teacher shaping accuracy" in e["message"]]
    assert len(check) == 1 and check[0]["level"] == ("warning" if low <= 0.5 <= high else "info")
    assert check[0]["data"]["pairs"] == teacher["teacher/pairs"]["value"]
    assert math.isclose(check[0]["data"]["accuracy"], accuracy["value"])
    store = [s for s in stores if s["fields"].get("value_beta") == 0.37]
    assert store and store[0]["fields"]["q_source"] == "implicit"
    assert store[0]["fields"]["teacher_reference"] == tiny_assets["student"]  # relative to its root

    # The teacher reference may be another job's model, "job:<id>" (here the student this job
    # trained: the teacher's tokenizer); an unknown job is a 422 naming the field.
    chained = {**hp, "teacher_reference": f"job:{job_id}", "value_beta": 0.38, "max_steps": 1}
    with client(api) as c:
        unknown = c.post(
            "/v1/jobs", json={**body, "hyperparameters": {**chained, "teacher_reference": "job:job_0"}}
        )
        assert unknown.status_code == 422
        assert unknown.json()["error"]["field"] == "hyperparameters.teacher_reference"
        created = c.post("/v1/jobs", json={**body, "hyperparameters": chained})
        assert created.status_code == 201, created.text
        second = created.json()["id"]
        assert created.json()["depends_on"] == {"teacher_reference": job_id}

        def second_finished() -> dict[str, Any] | None:
            job = c.get(f"/v1/jobs/{second}").json()
            return job if job["status"] in TERMINAL else None

        done = wait_for(second_finished, timeout=120, what=f"job {second} to finish")
        assert done["status"] == "succeeded", done["error"]
        stores = c.get("/v1/precomputes").json()["data"]
    store = [s for s in stores if s["fields"].get("value_beta") == 0.38]
    assert store and store[0]["fields"]["teacher_reference"] == f"jobs/{job_id}/model"


def test_inspect_with_a_teacher_reference(api: str, tiny_assets: dict[str, str]) -> None:
    request = {
        "teacher": tiny_assets["teacher"],
        "prompt": "What is 2+2?",
        "response": "It is 4.",
        "q_source": "implicit",
        "teacher_reference": tiny_assets["student"],
        "value_beta": 0.5,
    }
    with client(api) as c:
        result = c.post("/v1/inspect", json=request)
        assert result.status_code == 200, result.text
        model = result.json()
        pre_eos = c.post("/v1/inspect", json={**request, "terminal": "pre_eos"}).json()
        same = c.post("/v1/inspect", json={**request, "teacher_reference": tiny_assets["teacher"]}).json()
        missing = c.post("/v1/inspect", json={**request, "teacher_reference": None})
        outside = c.post("/v1/inspect", json={**request, "teacher_reference": "/etc"})
    tokens = model["tokens"]
    assert model["method"]["q_source"] == "implicit" and tokens[0]["value"] == 0.0  # V(s_1) = 0
    # γ = 1: Σψ = V(s_{T+1}) − V(s_1) (model), V(s_T) − V(s_1) (pre_eos).
    assert model["sum_psi"] == pytest.approx(model["value_end"], abs=1e-5)
    assert pre_eos["sum_psi"] == pytest.approx(tokens[-1]["value"], abs=1e-5)
    assert any(t["value"] != 0.0 for t in tokens[1:])
    assert all(t["value"] == 0.0 for t in same["tokens"]) and same["value_end"] == 0.0  # property 9
    for answer in (missing, outside):
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "teacher_reference"


def test_absent_shaping_accuracy_is_null_in_a_job_result() -> None:
    from service.views import with_null_metrics

    result = {"metrics": {"loss": 0.6}, "eval_metrics": {}, "train": {"metrics": {"loss": 0.6}}, "steps": 2}
    out = with_null_metrics(result)
    assert out["metrics"] == {"tvkd/shaping_accuracy": None, "loss": 0.6}
    assert out["train"]["metrics"]["tvkd/shaping_accuracy"] is None
    assert out["eval_metrics"] == {} and out["steps"] == 2 and result["metrics"] == {"loss": 0.6}
    kept = with_null_metrics({"metrics": {"tvkd/shaping_accuracy": 0.75}})
    assert kept["metrics"]["tvkd/shaping_accuracy"] == 0.75
