"""The REST API over real HTTP: a `tvkd serve` process per backend (SQLite and PostgreSQL), real
Redis as the broker, no workers (so submitted jobs stay where the API left them).

Every job these tests create is cancelled when the module ends, so that workers started later in
the same session (by other test modules) do not pick them up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import secrets
import shutil
import threading
import typing
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ALICE, BOB, SECRET, client, free_port, start_process, wait_for

from tvkd.config import MethodConfig, TrainConfig, config_fields

CREATED: list[tuple[str, str]] = []  # (api url, job id) of every job made here; cancelled at the end


# --------------------------------------------------------------------------------------------
# Helpers and fixtures


def assert_error(response: httpx.Response, status: int, field: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "field", "details"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    assert error["field"] == field, error
    if code is not None:
        assert error["code"] == code, error
    return error


def submit(http: httpx.Client, body: dict[str, Any], **kw: Any) -> httpx.Response:
    response = http.post("/v1/jobs", json=body, **kw)
    if response.status_code in (200, 201):
        CREATED.append((str(http.base_url), response.json()["id"]))
    return response


@pytest.fixture(scope="module", autouse=True)
def _cancel_created_jobs() -> Iterator[None]:
    yield
    for base_url, job_id in CREATED:
        # A 409 (already finished) is fine; an API process that is gone took no more jobs.
        with contextlib.suppress(httpx.HTTPError):
            client(base_url).post(f"/v1/jobs/{job_id}/cancel")
    CREATED.clear()


@pytest.fixture
def alice(api: str) -> Iterator[httpx.Client]:
    with client(api, ALICE) as http:
        yield http


@pytest.fixture
def bob(api: str) -> Iterator[httpx.Client]:
    with client(api, BOB) as http:
        yield http


@pytest.fixture
def body(tiny_assets: dict[str, str]) -> dict[str, Any]:
    return {
        "teacher": tiny_assets["teacher"],
        "student": tiny_assets["student"],
        "dataset": tiny_assets["dataset"],
    }


@pytest.fixture
def db(database_url: str) -> Iterator[Any]:
    """A session factory on the API's database, to arrange rows the workers would write."""
    from service.db import make_engine, session_factory

    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def paths(service_home: Path, tiny_assets: dict[str, str]) -> dict[str, str]:
    """Things that must be refused: a model and a dataset outside the roots, symlinks inside the
    roots that point at them, a folder that is no model, a file that is no dataset."""
    outside = service_home / "outside"
    outside.mkdir(exist_ok=True)
    if not (outside / "model").exists():
        shutil.copytree(service_home / "models" / tiny_assets["teacher"], outside / "model")
    shutil.copy(service_home / "data" / tiny_assets["dataset"], outside / "pairs.jsonl")
    for link, target in (
        (service_home / "models" / "evil", outside / "model"),
        (service_home / "data" / "evil.jsonl", outside / "pairs.jsonl"),
    ):
        if not link.is_symlink():
            link.symlink_to(target)
    (service_home / "models" / "empty_dir").mkdir(exist_ok=True)
    (service_home / "data" / "notes.txt").write_text("not a dataset\n")
    return {
        "outside_model": str(outside / "model"),
        "outside_data": str(outside / "pairs.jsonl"),
        "inside_data": str(service_home / "data" / tiny_assets["dataset"]),
        "inside_model": str(service_home / "models" / tiny_assets["teacher"]),
    }


def good_rows(service_home: Path, n: int = 4) -> list[str]:
    lines = (service_home / "data" / "tasks.jsonl").read_text().splitlines()
    return lines[:n]


# --------------------------------------------------------------------------------------------
# Health, auth, OpenAPI


def test_health_and_ready(api: str) -> None:
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "migrations": "ok", "broker": "ok"}


V1_ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567"),
    ("POST", "/v1/jobs/job_0123456789abcdef01234567/cancel"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567/events"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567/metrics"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567/checkpoints"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567/samples"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567/samples/0"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567/generations"),
    ("GET", "/v1/datasets"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/models"),
    ("GET", "/v1/precomputes"),
    ("POST", "/v1/inspect"),
]


@pytest.mark.parametrize(("method", "path"), V1_ROUTES, ids=[f"{m} {p}" for m, p in V1_ROUTES])
def test_every_v1_route_needs_a_key(api: str, method: str, path: str) -> None:
    missing = httpx.request(method, f"{api}{path}", json={})
    assert_error(missing, 401, None, "missing_api_key")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.request(method, f"{api}{path}", json={}, headers={"Authorization": "Bearer sk-nope"})
    assert_error(wrong, 401, None, "invalid_api_key")
    basic = httpx.request(method, f"{api}{path}", json={}, headers={"Authorization": "Basic YTpi"})
    assert_error(basic, 401, None, "missing_api_key")


def test_openapi_document_is_complete(api: str) -> None:
    doc = httpx.get(f"{api}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            ok = [c for c in responses if c.startswith("2")]
            assert ok, (method, path)
            for code in ok:
                content = responses[code].get("content", {})
                binary = content and all(
                    c.get("schema", {}).get("format") == "binary" for c in content.values()
                )
                # A declared model, or a file's bytes (a model download).
                assert binary or "$ref" in json.dumps(responses[code]), (method, path, code)
            errors = {c: r for c, r in responses.items() if c[0] in "45"}
            if path.startswith("/v1"):
                assert "401" in errors and "422" in errors, (method, path, sorted(responses))
            for code, response in errors.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", (method, path, code)
    # Every setting is documented with its help string and its range.
    hp = schemas["Hyperparameters"]
    assert hp["additionalProperties"] is False
    for name, prop in hp["properties"].items():
        assert prop.get("description"), name
    lr = hp["properties"]["learning_rate"]
    assert lr["exclusiveMinimum"] == 0 and lr["maximum"] == 1 and lr["default"] == 5e-6
    assert hp["properties"]["gamma"]["minimum"] == 0 and hp["properties"]["gamma"]["maximum"] == 1
    assert hp["properties"]["terminal"]["enum"] == ["model", "zero", "pre_eos"]
    job_create = schemas["JobCreate"]
    assert set(job_create["required"]) == {"student", "dataset"}  # teacher: kind tvkd only
    assert job_create["properties"]["beta"]["exclusiveMinimum"] == 0


def test_key_bootstrap_is_idempotent(db: Any) -> None:
    from sqlalchemy import func, select

    from service.auth import bootstrap_keys, hash_key, parse_key_entry
    from service.models import ApiKey

    secret = SECRET.encode()
    assert parse_key_entry("ops=sk-1") == ("ops", "sk-1")
    assert parse_key_entry("sk-bare") == ("bootstrap", "sk-bare")  # no part of the key in its name
    assert parse_key_entry("abc==") == ("bootstrap", "abc==")  # base64 padding, not name=key
    key = f"sk-boot-{secrets.token_hex(16)}"
    entries = [f"boot={key}", " ", key]  # the same key twice (named and bare): stored once
    assert bootstrap_keys(db, entries, secret) == 1
    assert bootstrap_keys(db, entries, secret) == 0
    with db() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key, secret))).all()
        assert [(r.name, r.hash_scheme) for r in rows] == [("boot", "hmac-sha256")]
        assert session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.key_hash == key)) == 0


# --------------------------------------------------------------------------------------------
# Creating jobs


def test_create_job_fills_defaults_and_records_warnings(alice: httpx.Client, body: dict[str, Any]) -> None:
    response = submit(
        alice,
        {
            **body,
            "alpha": 0.5,
            "hyperparameters": {"gamma": 1.0, "terminal": "zero"},
            "metadata": {"run": "a"},
        },
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["object"] == "job" and job["id"].startswith("job_")
    assert (job["status"], job["stage"]) == ("validating", "validate")
    assert job["progress"] == {"done": 0, "total": 0, "fraction": None, "eta_seconds": None}
    assert (job["alpha"], job["beta"]) == (0.5, MethodConfig().beta)
    hp = job["hyperparameters"]
    defaults = TrainConfig().to_dict()
    assert hp["learning_rate"] == defaults["learning_rate"] and hp["epochs"] == defaults["epochs"]
    assert hp["terminal"] == "zero" and hp["value_beta"] == 1.0
    assert job["metadata"] == {"run": "a"}
    assert len(job["warnings"]) == 1 and "plain DPO" in job["warnings"][0]
    assert job["error"] is None and job["result"] is None and job["model_path"] is None
    assert job["created_at"].endswith("Z") and job["started_at"] is None
    assert alice.get(f"/v1/jobs/{job['id']}").json() == job
    events = alice.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["level"] for e in events[:2]] == ["info", "warning"]
    assert "plain DPO" in events[1]["message"]


def test_paths_inside_the_roots_are_accepted(
    alice: httpx.Client, body: dict[str, Any], paths: dict[str, str]
) -> None:
    response = submit(alice, {**body, "dataset": paths["inside_data"], "teacher": paths["inside_model"]})
    assert response.status_code == 201, response.text
    # boundaries of the ranges are legal
    hp = {"gamma": 0.0, "warmup_ratio": 1.0, "eval_fraction": 0.0, "max_steps": 0, "learning_rate": 1.0}
    response = submit(alice, {**body, "alpha": 0.0, "hyperparameters": hp})
    assert response.status_code == 201, response.text


def _out_of_range(hint: Any, bounds: dict[str, float]) -> list[tuple[str, Any]]:
    step = 1 if hint is int else 0.25
    cases = []
    for kind, bound in bounds.items():
        value = {"ge": bound - step, "gt": bound, "le": bound + step, "lt": bound}[kind]
        cases.append((kind, int(value) if hint is int else float(value)))
    return cases


def _range_cases() -> list[Any]:
    cases = []
    for cls in (MethodConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for name, bounds in ((f.name, f.bounds) for f in config_fields(cls) if f.bounds):
            for kind, value in _out_of_range(hints[name], bounds):
                field = name if name in ("alpha", "beta") else f"hyperparameters.{name}"
                patch = {name: value} if name in ("alpha", "beta") else {"hyperparameters": {name: value}}
                cases.append(pytest.param(patch, field, id=f"{name}-{kind}-{value}"))
    return cases


RANGE_CASES = _range_cases()


def test_every_range_is_covered() -> None:
    names = {p.values[1].split(".")[-1] for p in RANGE_CASES}
    fields = {f.name for cls in (MethodConfig, TrainConfig) for f in dataclasses.fields(cls)}
    numeric = {
        f.name
        for cls in (MethodConfig, TrainConfig)
        for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] in (int, float)
    }
    assert numeric <= names <= fields, numeric - names


@pytest.mark.parametrize(("patch", "field"), RANGE_CASES)
def test_each_range_is_a_422_naming_the_field(
    alice: httpx.Client, body: dict[str, Any], patch: dict[str, Any], field: str
) -> None:
    assert_error(submit(alice, {**body, **patch}), 422, field)


BadCase = Callable[[dict[str, Any], dict[str, str]], dict[str, Any]]


def _hp(**kw: Any) -> BadCase:
    return lambda b, p: {**b, "hyperparameters": kw}


def _set(**kw: Any) -> BadCase:
    return lambda b, p: {**b, **kw}


def _path(key: str, name: str) -> BadCase:
    return lambda b, p: {**b, key: p[name]}


BAD_REQUESTS: list[tuple[str, BadCase, str, str | None]] = [
    ("unknown hyperparameter", _hp(learnig_rate=1e-5), "hyperparameters.learnig_rate", "unknown_field"),
    ("unknown top-level key", _set(epochs=2), "epochs", "unknown_field"),
    ("alpha as string", _set(alpha="0.5"), "alpha", "invalid_type"),
    ("beta as null", _set(beta=None), "beta", "invalid_type"),
    ("int setting as float", _hp(batch_size=1.5), "hyperparameters.batch_size", "invalid_type"),
    ("int setting as string", _hp(max_steps="10"), "hyperparameters.max_steps", "invalid_type"),
    ("bool setting as int", _hp(bf16=1), "hyperparameters.bf16", "invalid_type"),
    ("choice not allowed", _hp(terminal="maybe"), "hyperparameters.terminal", None),
    (
        "list as string",
        _hp(lora_target_modules="q_proj"),
        "hyperparameters.lora_target_modules",
        "invalid_type",
    ),
    ("list item type", _hp(lora_target_modules=["q", 1]), "hyperparameters.lora_target_modules[1]", None),
    ("hyperparameters not an object", _set(hyperparameters=[1]), "hyperparameters", "invalid_type"),
    ("metadata value type", _set(metadata={"a": 1}), "metadata.a", "invalid_type"),
    ("metadata too many", _set(metadata={f"k{i}": "v" for i in range(17)}), "metadata", None),
    (
        "missing teacher",
        lambda b, p: {k: v for k, v in b.items() if k != "teacher"},
        "teacher",
        "missing_field",
    ),
    (
        "missing dataset",
        lambda b, p: {k: v for k, v in b.items() if k != "dataset"},
        "dataset",
        "missing_field",
    ),
    ("teacher as number", _set(teacher=5), "teacher", "invalid_type"),
    ("empty student", _set(student=""), "student", None),
    ("NUL in dataset", _set(dataset="tasks\x00.jsonl"), "dataset", None),
    ("teacher not found", _set(teacher="no-such-model"), "teacher", "invalid_model"),
    ("student '..' out of the root", _set(student="../outside/model"), "student", "invalid_model"),
    ("teacher absolute outside", _path("teacher", "outside_model"), "teacher", "invalid_model"),
    ("teacher symlink out", _set(teacher="evil"), "teacher", "invalid_model"),
    ("student without config.json", _set(student="empty_dir"), "student", "invalid_model"),
    ("dataset '..' out of the root", _set(dataset="../outside/pairs.jsonl"), "dataset", "path_outside_roots"),
    ("dataset absolute outside", _path("dataset", "outside_data"), "dataset", "path_outside_roots"),
    ("dataset symlink out", _set(dataset="evil.jsonl"), "dataset", "path_outside_roots"),
    ("dataset /etc/passwd", _set(dataset="/etc/passwd"), "dataset", "path_outside_roots"),
    ("dataset missing", _set(dataset="nope.jsonl"), "dataset", "invalid_dataset"),
    ("dataset not a data file", _set(dataset="notes.txt"), "dataset", "invalid_dataset"),
    ("unknown dataset id", _set(dataset="ds_0123456789abcdef01234567"), "dataset", "unknown_dataset"),
    ("malformed dataset id", _set(dataset="ds_../../x"), "dataset", "unknown_dataset"),
    (
        "eval dataset out of the root",
        _hp(eval_dataset="../outside/pairs.jsonl"),
        "hyperparameters.eval_dataset",
        "path_outside_roots",
    ),
    ("limit zero", _hp(limit=0), "hyperparameters.limit", None),
    (
        "reward model out of the root",
        _hp(reward_model="../outside/model"),
        "hyperparameters.reward_model",
        "invalid_model",
    ),
    (
        "reward model not found",
        _hp(reward_model="no-such-rm"),
        "hyperparameters.reward_model",
        "invalid_model",
    ),
    ("too many generation prompts", _hp(gen_prompts=257), "hyperparameters.gen_prompts", None),
    ("no new tokens", _hp(gen_max_new_tokens=0), "hyperparameters.gen_max_new_tokens", None),
]


@pytest.mark.parametrize(
    ("make", "field", "code"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_is_a_422_naming_the_field(
    alice: httpx.Client,
    body: dict[str, Any],
    paths: dict[str, str],
    make: BadCase,
    field: str,
    code: str | None,
) -> None:
    assert_error(submit(alice, make(body, paths)), 422, field, code)


def test_malformed_bodies(alice: httpx.Client, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/json"}
    assert_error(alice.post("/v1/jobs", content=b"{not json", headers=headers), 422, None, "invalid_json")
    nan = json.dumps({**body, "alpha": math.nan})  # Python writes NaN; it is no finite number
    assert_error(alice.post("/v1/jobs", content=nan, headers=headers), 422, "alpha")
    assert_error(alice.post("/v1/jobs", content=b"[]", headers=headers), 422, None)
    assert_error(alice.post("/v1/jobs", content=b"", headers=headers), 422, None)


def test_query_errors_name_the_parameter(alice: httpx.Client) -> None:
    assert_error(alice.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    assert_error(alice.get("/v1/jobs", params={"limit": 101}), 422, "limit")
    assert_error(alice.get("/v1/jobs", params={"limit": "ten"}), 422, "limit", "invalid_type")
    assert_error(alice.get("/v1/jobs", params={"status": "sleeping"}), 422, "status")
    assert_error(
        alice.get("/v1/jobs", params={"after": "job_0123456789abcdef"}), 422, "after", "invalid_cursor"
    )
    assert_error(alice.get("/v1/jobs/job_0123/events", params={"after": -1}), 422, "after")
    assert_error(alice.get("/v1/datasets", params={"after": "ds_00"}), 422, "after", "invalid_cursor")
    assert_error(alice.get("/v1/nope"), 404, None, "not_found")
    assert_error(alice.delete("/v1/jobs"), 405, None, "method_not_allowed")


def test_unknown_and_malformed_ids_are_404(alice: httpx.Client) -> None:
    for job_id in ("job_0123456789abcdef01234567", "nope", "job_%00", "JOB_1"):
        assert_error(alice.get(f"/v1/jobs/{job_id}"), 404, None, "not_found")
        assert_error(alice.post(f"/v1/jobs/{job_id}/cancel"), 404, None, "not_found")


def test_another_keys_job_is_404(alice: httpx.Client, bob: httpx.Client, body: dict[str, Any]) -> None:
    job = submit(alice, body).json()
    for path in ("", "/events", "/metrics", "/metrics/series", "/checkpoints", "/samples", "/samples/0"):
        assert_error(bob.get(f"/v1/jobs/{job['id']}{path}"), 404, None, "not_found")
    assert_error(bob.post(f"/v1/jobs/{job['id']}/cancel"), 404, None, "not_found")
    assert job["id"] not in {j["id"] for j in bob.get("/v1/jobs", params={"limit": 100}).json()["data"]}
    assert alice.get(f"/v1/jobs/{job['id']}").json()["status"] == "validating"  # bob's cancel did nothing


# --------------------------------------------------------------------------------------------
# Idempotency


def test_idempotency_key(alice: httpx.Client, bob: httpx.Client, body: dict[str, Any]) -> None:
    key = {"Idempotency-Key": f"retry-{secrets.token_hex(4)}"}
    first = submit(alice, body, headers=key)
    assert first.status_code == 201, first.text
    again = submit(alice, body, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # The same request spelled differently (key order, defaults written out) is the same request.
    spelled = {"dataset": body["dataset"], "alpha": 0.7, **body, "hyperparameters": {"epochs": 1.0}}
    same = submit(alice, spelled, headers=key)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    other = submit(alice, {**body, "alpha": 0.3}, headers=key)
    assert_error(other, 422, "Idempotency-Key", "idempotency_key_reused")
    # Keys are per API key: bob's identical key is his own job.
    bobs = submit(bob, body, headers=key)
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    assert_error(submit(alice, body, headers={"Idempotency-Key": "x" * 201}), 422, "Idempotency-Key")


def test_concurrent_identical_requests_make_one_job(api: str, body: dict[str, Any], db: Any) -> None:
    from sqlalchemy import func, select

    from service.models import Job

    key = f"race-{secrets.token_hex(4)}"
    n = 8
    barrier = threading.Barrier(n)

    def post(_: int) -> httpx.Response:
        with client(api, ALICE) as http:
            barrier.wait()
            return submit(http, body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(post, range(n)))
    assert sorted(r.status_code for r in responses) == [200] * (n - 1) + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == key)) == 1


# --------------------------------------------------------------------------------------------
# Pagination


@pytest.fixture
def carol(api: str, db: Any) -> Iterator[httpx.Client]:
    """A fresh API key with no jobs, so its listings hold exactly what a test makes."""
    from service.auth import create_key

    _, key = create_key(db, "carol", SECRET.encode())
    with client(api, key) as http:
        yield http


def walk(
    http: httpx.Client, path: str, limit: int, cursor: str = "id", **params: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    for _ in range(100):
        query = {"limit": limit, **params, **({"after": after} if after is not None else {})}
        page = http.get(path, params=query).json()
        assert page["object"] == "list" and len(page["data"]) <= limit
        items += page["data"]
        if not page["has_more"]:
            assert page["next_after"] is None
            return items
        assert len(page["data"]) == limit
        after = page["next_after"]
        assert after == page["data"][-1][cursor]
    raise AssertionError("pagination did not end")


def test_job_pagination_walks_every_job_once(carol: httpx.Client, body: dict[str, Any]) -> None:
    made = [submit(carol, body).json()["id"] for _ in range(7)]
    for limit in (1, 3, 7, 100):
        seen = walk(carol, "/v1/jobs", limit)
        assert [j["id"] for j in seen] == made[::-1]  # newest first, none missing or repeated
    cancelled = made[1:3]
    for job_id in cancelled:
        assert carol.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    only = walk(carol, "/v1/jobs", 1, status="cancelled")
    assert [j["id"] for j in only] == cancelled[::-1]
    assert {j["status"] for j in walk(carol, "/v1/jobs", 2, status="validating")} == {"validating"}


def test_event_pagination(carol: httpx.Client, body: dict[str, Any], db: Any) -> None:
    from service.jobstate import add_event

    job_id = submit(carol, body).json()["id"]
    with db() as session:
        for i in range(25):
            add_event(session, job_id, f"event {i}", stage="train", data={"i": i})
        session.commit()
    for limit in (1, 10, 1000):
        events = walk(carol, f"/v1/jobs/{job_id}/events", limit)
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids))  # ascending, no duplicates
        assert [e["data"].get("i") for e in events if "i" in e["data"]] == list(range(25))
    last = events[-1]["id"]
    tail = carol.get(f"/v1/jobs/{job_id}/events", params={"after": last}).json()
    assert tail == {"object": "list", "data": [], "has_more": False, "next_after": None}


# --------------------------------------------------------------------------------------------
# Metrics, checkpoints, samples and the model of a job (rows a worker would write)


def test_metrics_checkpoints_samples_and_result(
    carol: httpx.Client, body: dict[str, Any], db: Any, service_home: Path
) -> None:
    from service.models import Artifact, Checkpoint, Job, MetricPoint, utcnow

    job_id = submit(carol, body).json()["id"]
    assert_error(carol.get(f"/v1/jobs/{job_id}/samples"), 404, None, "not_found")
    rel = f"jobs/{job_id}"
    out = service_home / "artifacts" / rel
    (out / "model").mkdir(parents=True)
    token = {"text": "a", "id": 5, "logratio": 0.1, "value": 1.0, "psi": -0.5, "teacher_logp": -2.0}
    side = {"text": "a", "tokens": [token, {**token, "psi": 0.25}], "sum_psi": -0.25, "sum_logratio": 0.2,
            "value_end": 0.5}  # fmt: skip
    samples = [{"index": i, "row": 10 + i, "prompt": "p", "chosen": side, "rejected": side} for i in range(3)]
    (out / "samples.json").write_text(
        json.dumps({"step": 7, "loss_options": {"beta": 0.1}, "samples": samples})
    )
    with db() as session:
        for step in range(1, 6):
            for name, value in (("loss", 1.0 / step), ("acc", 0.5)):
                session.add(MetricPoint(job_id=job_id, split="train", step=step, name=name, value=value))
        session.add(MetricPoint(job_id=job_id, split="eval", step=5, name="loss", value=math.inf))
        session.add(Checkpoint(job_id=job_id, step=2, path=f"{rel}/checkpoint-2"))
        session.add(Checkpoint(job_id=job_id, step=4, path=f"{rel}/checkpoint-4"))
        session.add(Artifact(job_id=job_id, kind="samples", path=f"{rel}/samples.json"))
        session.add(Artifact(job_id=job_id, kind="model", path=f"{rel}/model"))
        job = session.get(Job, job_id)
        job.status, job.stage, job.finished_at = "succeeded", "evaluate", utcnow()
        job.progress_done, job.progress_total = 3, 4
        job.result = {"eval_metrics": {"loss": 0.4}}
        session.commit()

    got = carol.get(f"/v1/jobs/{job_id}").json()
    # tvkd/shaping_accuracy is absent from the run's metrics (shaping off): null here (MATH.md).
    want = {"eval_metrics": {"loss": 0.4, "tvkd/shaping_accuracy": None}}
    assert got["model_path"] == f"{rel}/model" and got["result"] == want
    assert got["progress"]["fraction"] == 0.75
    assert_error(carol.post(f"/v1/jobs/{job_id}/cancel"), 409, None, "job_finished")

    points = walk(carol, f"/v1/jobs/{job_id}/metrics", 4)
    assert len(points) == 11
    eval_loss = carol.get(f"/v1/jobs/{job_id}/metrics", params={"split": "eval"}).json()["data"]
    assert [(p["name"], p["value"]) for p in eval_loss] == [("loss", None)]  # inf is no JSON number
    late = carol.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss", "after_step": 3}).json()["data"]
    assert [(p["split"], p["step"]) for p in late] == [("train", 4), ("train", 5), ("eval", 5)]
    series = carol.get(f"/v1/jobs/{job_id}/metrics/series", params={"split": "train"}).json()
    assert series["object"] == "metric_series"
    by_name = {s["name"]: s for s in series["data"]}
    assert by_name["loss"]["steps"] == [1, 2, 3, 4, 5] and by_name["loss"]["values"][1] == 0.5

    checkpoints = walk(carol, f"/v1/jobs/{job_id}/checkpoints", 1)
    assert [c["step"] for c in checkpoints] == [2, 4]

    listed = walk(carol, f"/v1/jobs/{job_id}/samples", 2, cursor="k")
    assert [s["k"] for s in listed] == [0, 1, 2]
    assert (
        listed[1]["row"] == 11
        and listed[1]["chosen"]["tokens"] == 2
        and listed[1]["chosen"]["sum_psi"] == -0.25
    )
    detail = carol.get(f"/v1/jobs/{job_id}/samples/2").json()
    assert detail["object"] == "sample" and detail["step"] == 7 and detail["index"] == 2
    assert [t["psi"] for t in detail["rejected"]["tokens"]] == [-0.5, 0.25]
    assert detail["chosen"]["side"] == "chosen" and detail["chosen"]["value_start"] == 1.0
    assert_error(carol.get(f"/v1/jobs/{job_id}/samples/3"), 404, None, "not_found")
    assert_error(carol.get(f"/v1/jobs/{job_id}/samples/-1"), 422, "k")


# --------------------------------------------------------------------------------------------
# Cancel


def test_cancel_a_job_no_worker_has_started(alice: httpx.Client, body: dict[str, Any]) -> None:
    job = submit(alice, body).json()
    cancelled = alice.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    # No worker runs in this module, so the job ends at once; were one running, it would get there too.
    final = wait_for(
        lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json())["status"] == "cancelled" and j,
        timeout=30,
        what="the job to be cancelled",
    )
    assert final["finished_at"] is not None
    assert any("cancel" in e["message"] for e in alice.get(f"/v1/jobs/{job['id']}/events").json()["data"])
    assert_error(alice.post(f"/v1/jobs/{job['id']}/cancel"), 409, None, "job_finished")


# --------------------------------------------------------------------------------------------
# Datasets


def _upload(http: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return http.post("/v1/datasets", files={"file": (name, data, "application/octet-stream")})


def test_dataset_upload_good_bad_and_use(
    alice: httpx.Client, bob: httpx.Client, body: dict[str, Any], service_home: Path
) -> None:
    rows = good_rows(service_home, 5)
    response = _upload(alice, "my pairs.jsonl", ("\n".join(rows) + "\n").encode())
    assert response.status_code == 201, response.text
    ds = response.json()
    assert ds["object"] == "dataset" and ds["id"].startswith("ds_")
    assert (ds["rows"], ds["pairs"], ds["filename"]) == (5, 5, "my_pairs.jsonl")
    stored = service_home / "artifacts" / "datasets" / ds["id"] / "my_pairs.jsonl"
    assert stored.read_text().splitlines() == rows
    assert ds["id"] in {d["id"] for d in alice.get("/v1/datasets").json()["data"]}
    assert alice.get(f"/v1/datasets/{ds['id']}").json() == ds
    # Only its owner may read or use it.
    assert ds["id"] not in {d["id"] for d in bob.get("/v1/datasets").json()["data"]}
    assert_error(bob.get(f"/v1/datasets/{ds['id']}"), 404, None, "not_found")
    assert_error(submit(bob, {**body, "dataset": ds["id"]}), 422, "dataset", "unknown_dataset")
    used = submit(alice, {**body, "dataset": ds["id"]})
    assert used.status_code == 201, used.text

    # Parquet too.
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([json.loads(r) for r in rows]), buffer)
    parquet = _upload(alice, "pairs.parquet", buffer.getvalue())
    assert parquet.status_code == 201 and parquet.json()["pairs"] == 5, parquet.text

    # Bad rows: 422 naming the first bad row and field, every issue in details; nothing kept.
    missing = {k: v for k, v in json.loads(rows[0]).items() if k != "rejected"}
    bad = [*rows[:2], json.dumps(missing), "not json", rows[2]]
    error = assert_error(
        _upload(alice, "bad.jsonl", "\n".join(bad).encode()), 422, "file.rows[2].rejected", "invalid_dataset"
    )
    assert [(d["row"], d["field"]) for d in error["details"]] == [(2, "rejected"), (3, "<row>")]
    assert "bad.jsonl" in error["message"] and ".incoming" not in error["message"]
    assert_error(_upload(alice, "notes.txt", b"hello"), 422, "file", "unsupported_type")
    assert_error(_upload(alice, "empty.jsonl", b""), 422, "file", "invalid_dataset")
    assert_error(_upload(alice, "bad.parquet", b"PAR1 not really"), 422, "file", "invalid_dataset")
    assert_error(alice.post("/v1/datasets", data={"x": "1"}), 422, "file", "invalid_upload")
    no_file = alice.post("/v1/datasets", files={"other": ("a.jsonl", b"{}")})
    assert_error(no_file, 422, "file", "missing_file")
    incoming = service_home / "artifacts" / "datasets" / ".incoming"
    assert not incoming.exists() or not any(incoming.iterdir())


# --------------------------------------------------------------------------------------------
# Models, precomputes, inspect


def test_models_lists_the_tiny_models(alice: httpx.Client, paths: dict[str, str]) -> None:
    models = walk(alice, "/v1/models", 1)
    by_id = {m["id"]: m for m in models}
    assert {"teacher", "student"} <= set(by_id)
    assert "evil" not in by_id and "empty_dir" not in by_id  # a symlink out of the root; no config.json
    teacher = by_id["teacher"]
    assert teacher["object"] == "model" and teacher["architecture"] == "LlamaForCausalLM"
    assert teacher["model_type"] == "llama" and teacher["params"] > 0 and teacher["has_chat_template"]


def test_precomputes_are_listed_for_the_keys_jobs(carol: httpx.Client, body: dict[str, Any], db: Any) -> None:
    from service.models import Job, Precompute

    job_id = submit(carol, body).json()["id"]
    assert carol.get("/v1/precomputes").json()["data"] == []
    key = secrets.token_hex(32)
    with db() as session:
        session.add(
            Precompute(key=key, teacher="teacher", path=f"values/{key}", job_id=job_id, fields={"q": 1})
        )
        session.add(Precompute(key=secrets.token_hex(32), teacher="other", path="values/x"))  # not carol's
        session.get(Job, job_id).precompute_key = key
        session.commit()
    data = carol.get("/v1/precomputes").json()["data"]
    assert [(p["key"], p["status"], p["fields"]) for p in data] == [(key, "running", {"q": 1})]


def test_inspect(alice: httpx.Client, body: dict[str, Any], paths: dict[str, str]) -> None:
    request = {"teacher": body["teacher"], "prompt": "What is 2+2?", "response": "It is 4."}
    response = alice.post("/v1/inspect", json=request)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "inspection" and result["tokenization"] == "teacher"
    assert len(result["tokens"]) >= 2
    assert math.isclose(result["sum_psi"], sum(t["psi"] for t in result["tokens"]), abs_tol=1e-4)
    zero = alice.post("/v1/inspect", json={**request, "terminal": "zero", "gamma": 0.5}).json()
    assert zero["method"]["terminal"] == "zero" and zero["method"]["gamma"] == 0.5
    chat = alice.post("/v1/inspect", json={**request, "prompt": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    assert_error(alice.post("/v1/inspect", json={**request, "response": "x" * 8001}), 422, "response")
    assert_error(alice.post("/v1/inspect", json={**request, "teacher": "evil"}), 422, "teacher")
    bad_msg = {**request, "prompt": [{"role": "user", "content": 1}]}
    assert_error(alice.post("/v1/inspect", json=bad_msg), 422, "prompt[0].content")
    assert_error(alice.post("/v1/inspect", json={**request, "gamma": 2}), 422, "gamma")
    too_long = {**request, "response": "word " * 1500, "max_length": 16}
    assert_error(alice.post("/v1/inspect", json=too_long), 422, "response")


# --------------------------------------------------------------------------------------------
# A second API process: tiny upload limit and a broker that is down


@pytest.fixture(scope="module")
def limited_api(service_env: dict[str, str], service_home: Path) -> Iterator[str]:
    env = {**service_env, "TVKD_MAX_UPLOAD_BYTES": "4096", "TVKD_BROKER_URL": "redis://127.0.0.1:1/0"}
    port = free_port()
    proc = start_process(
        "api-limited",
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"],
        env,
        service_home,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            pytest.fail(f"the limited API did not start:\n{proc.tail()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=60, what="the limited API")
    yield url
    proc.stop()


def test_upload_limit_is_413(limited_api: str, service_home: Path) -> None:
    rows = good_rows(service_home, 40)
    medium = ("\n".join(rows) + "\n").encode()  # over the limit: cut off while streaming
    huge = medium * 8  # over the limit and the framing allowance: refused by its Content-Length
    assert 4096 < len(medium) < 64 * 1024 < len(huge)
    with client(limited_api, ALICE) as http:
        small = _upload(http, "small.jsonl", ("\n".join(rows[:2]) + "\n").encode())
        assert small.status_code == 201, small.text
        assert_error(_upload(http, "medium.jsonl", medium), 413, "file", "upload_too_large")
        assert_error(_upload(http, "huge.jsonl", huge), 413, "file", "upload_too_large")
        big = medium
        # Without a Content-Length (chunked), the body is cut off past the limit as it streams.
        boundary = "tvkdboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def chunks() -> Iterator[bytes]:
            yield head
            for i in range(0, len(big), 1024):
                yield big[i : i + 1024]
            yield tail

        chunked = http.post(
            "/v1/datasets",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "content-length" not in {k.lower() for k in chunked.request.headers}
        assert_error(chunked, 413, "file", "upload_too_large")
    incoming = service_home / "artifacts" / "datasets" / ".incoming"
    assert not incoming.exists() or not any(incoming.iterdir())


def test_broker_down_is_not_ready_but_jobs_are_kept(limited_api: str, body: dict[str, Any], db: Any) -> None:
    from service.models import Job

    ready = httpx.get(f"{limited_api}/readyz")
    error = assert_error(ready, 503, None, "not_ready")
    assert "broker" in error["message"]
    assert {d["check"]: d["status"] for d in error["details"]}["database"] == "ok"
    with client(limited_api, ALICE) as http:
        created = submit(http, body)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        events = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert any(e["level"] == "warning" and "broker" in e["message"] for e in events), events
    with db() as session:
        assert session.get(Job, job_id).enqueued_at is not None  # so the reconciler re-sends it


def test_client_cli(api: str, body: dict[str, Any], service_env: dict[str, str]) -> None:
    """`tvkd submit/status/cancel` against the live API, as a user runs them."""
    import subprocess
    import sys

    env = {**service_env, "TVKD_API_URL": api, "TVKD_API_KEY": ALICE}

    def tvkd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tvkd.cli", *args], env=env, capture_output=True, text=True, timeout=60
        )

    out = tvkd("submit", "--teacher", body["teacher"], "--student", body["student"], "--dataset",
               body["dataset"], "--alpha", "0.5", "--hp", "epochs=2", "--hp", "terminal=zero",
               "--metadata", "who=cli", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    CREATED.append((api, job["id"]))
    assert job["hyperparameters"]["epochs"] == 2.0 and job["hyperparameters"]["terminal"] == "zero"
    assert job["metadata"] == {"who": "cli"}
    listed = tvkd("status")
    assert listed.returncode == 0 and job["id"] in listed.stdout
    one = tvkd("status", job["id"])
    assert one.returncode == 0 and "validating" in one.stdout
    bad = tvkd("submit", "--teacher", "../x", "--student", "s", "--dataset", "d")
    assert bad.returncode == 1 and "(field: " in bad.stderr and "422" in bad.stderr
    bad_hp = tvkd("submit", "--teacher", "t", "--student", "s", "--dataset", "d", "--hp", "nope=1")
    assert bad_hp.returncode == 1 and "hyperparameters.nope" in bad_hp.stderr
    cancelled = tvkd("cancel", job["id"])
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    # A chain from the command line: --id-only for $(...), job:<id> for another job's model.
    sft = tvkd(
        "submit", "--kind", "sft", "--student", body["student"], "--dataset", body["dataset"], "--id-only"
    )
    assert sft.returncode == 0, sft.stderr
    head = sft.stdout.strip()
    CREATED.append((api, head))
    dpo = tvkd(
        "submit", "--kind", "dpo", "--student", f"job:{head}", "--dataset", body["dataset"], "--id-only"
    )
    assert dpo.returncode == 0, dpo.stderr
    CREATED.append((api, dpo.stdout.strip()))
    line = tvkd("status", dpo.stdout.strip()).stdout
    assert "dpo" in line and "waiting" in line and f"(uses student={head})" in line
    no_teacher = tvkd("submit", "--student", body["student"], "--dataset", body["dataset"])
    assert no_teacher.returncode == 1 and "(field: teacher)" in no_teacher.stderr
    again = tvkd("cancel", job["id"])
    assert again.returncode == 1 and "409" in again.stderr
    no_key = subprocess.run(
        [sys.executable, "-m", "tvkd.cli", "status"],
        env={**env, "TVKD_API_KEY": ""},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
    )
    assert no_key.returncode == 2 and "TVKD_API_KEY" in no_key.stderr
