"""Non-finite numbers through the service (real API, worker, SQLite and PostgreSQL): a NaN
teacher fails the job with code nonfinite_teacher naming the row; a stage whose result holds
NaN fails the job once with code nonfinite_result (on PostgreSQL its JSON column refused the
write, and the stage ran again and again); overflowing hyperparameters are a 422 naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import WorkerPool, client, wait_for
from safetensors.torch import load_file, save_file

TERMINAL = {"succeeded", "failed", "cancelled"}
ROWS = [{"prompt": f"Q: {a}+1=", "chosen": f" {a + 1}", "rejected": f" {a + 2}"} for a in range(8)]


def _poison(src: Path, dst: Path, name: str) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(dst / "model.safetensors")
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def nan_assets(service_home: Path, tiny_assets: dict[str, str]) -> dict[str, str]:
    models = service_home / "models"
    _poison(models / tiny_assets["teacher"], models / "nan_teacher", "lm_head.weight")
    _poison(models / tiny_assets["student"], models / "nan_student", "model.norm.weight")
    (service_home / "data" / "nonfinite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "teacher": tiny_assets["teacher"],
        "student": tiny_assets["student"],
        "dataset": "nonfinite.jsonl",
    }


def _run(api: str, body: dict[str, Any], pool: WorkerPool) -> dict[str, Any]:
    pool.ensure_one()
    with client(api) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        return wait_for(
            lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in TERMINAL and j,
            timeout=90,
            what=f"job {job_id} to end",
        )


def test_nan_teacher_fails_the_job_naming_the_row(api, workers, nan_assets):
    body = {
        **nan_assets, "teacher": "nan_teacher", "alpha": 0.7, "beta": 0.1,
        "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_length": 64},
    }  # fmt: skip
    job = _run(api, body, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "nonfinite_teacher"
    assert "nan_teacher" in job["error"]["message"] and "row 0" in job["error"]["message"]


def test_a_nonfinite_stage_result_fails_the_job_once(api, workers, nan_assets):
    # A student whose outputs are NaN: its one step is skipped (tolerated: max_skipped_fraction=1),
    # and the held-out metrics of the train stage's result are NaN.
    body = {
        **nan_assets, "student": "nan_student", "alpha": 0.0, "beta": 0.1,
        "hyperparameters": {"max_steps": 1, "batch_size": 2, "max_length": 64, "max_skipped_fraction": 1.0,
                            "eval_fraction": 0.25},
    }  # fmt: skip
    job = _run(api, body, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "nonfinite_result"
    assert "eval_metrics" in job["error"]["message"]
    with client(api) as c:
        events = c.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    # The train stage ran once: it was not re-run after its result could not be stored.
    assert sum(e["message"].startswith("train running on") for e in events) == 1


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"alpha": 1e30}, "alpha"),
        ({"beta": 1e30}, "beta"),
        ({"hyperparameters": {"value_beta": 1e-40}}, "hyperparameters.value_beta"),
    ],
)
def test_overflowing_hyperparameters_are_422(api, nan_assets, patch, field):
    with client(api) as c:
        r = c.post("/v1/jobs", json={**nan_assets, "alpha": 0.5, "beta": 0.1, **patch})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
