"""Information disclosure (issue 10, fault 5), with a real API, real workers and real jobs on
SQLite and PostgreSQL: no answer of the API (lists, jobs, events, metrics, samples, value stores,
models, errors) holds an absolute server path, a Python traceback, SQL, or another key's job ids;
and a path outside the roots gets the same answer whether it exists or not."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ALICE, BOB, REPO, WorkerPool, client, wait_for

from service.db import transaction
from service.jobstate import add_event
from tvkd.tasks import generate, split, write_jsonl

SQL = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b|\[SQL:|sqlalche\.me|psycopg\.")
SETTINGS = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "num_samples": 1}


@pytest.fixture
def db(database_url: str) -> Iterator[Any]:
    from service.db import make_engine, session_factory

    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def run_job(http: httpx.Client, body: dict[str, Any], status: str, pool: WorkerPool) -> dict[str, Any]:
    created = http.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    def finished() -> dict[str, Any] | None:
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["finished_at"] else None

    job = wait_for(finished, timeout=240, interval=0.5, what=f"job {job_id} to finish")
    assert job["status"] == status, (job, "\n".join(p.tail(40) for p in pool.procs))
    return job


def crawl(http: httpx.Client, job_ids: list[str]) -> list[httpx.Response]:
    """Every answer a key gets about its jobs and the service."""
    answers = [http.get(path) for path in ("/v1/jobs", "/v1/precomputes", "/v1/models", "/v1/datasets")]
    for job_id in job_ids:
        base = f"/v1/jobs/{job_id}"
        for tail in ("", "/metrics", "/metrics/series", "/checkpoints", "/samples", "/samples/0"):
            answers.append(http.get(base + tail))
        after = 0
        while True:
            page = http.get(f"{base}/events", params={"after": after, "limit": 5})
            answers.append(page)
            if not page.json()["has_more"]:
                break
            after = page.json()["next_after"]
    return answers


def assert_discloses_nothing(answers: list[httpx.Response], forbidden: dict[str, str]) -> None:
    for answer in answers:
        text = answer.text
        where = f"{answer.request.method} {answer.request.url.path} → {answer.status_code}: {text[:3000]}"
        assert answer.status_code < 500, where
        for what, needle in forbidden.items():
            assert needle not in text, (what, where)
        assert "Traceback" not in text and 'File "' not in text, where
        assert not SQL.search(text), where


def test_no_answer_discloses_paths_tracebacks_sql_or_other_keys_jobs(
    api: str, workers: WorkerPool, tiny_assets: dict[str, str], service_home: Path, db: Any
) -> None:
    # A dataset of this test's own, so that the teacher values are computed here, by bob's job.
    name = f"disclosure-{secrets.token_hex(4)}.jsonl"
    train, held_out = split(generate(24, seed=7), eval_count=4)
    write_jsonl(train + held_out, service_home / "data" / name)
    # A teacher whose config and tokenizer load (so the API accepts it) but whose weights are
    # garbage: its job fails in the worker, with an exception naming files under the model root.
    broken = f"broken-{secrets.token_hex(4)}"
    shutil.copytree(service_home / "models" / tiny_assets["teacher"], service_home / "models" / broken)
    for weights in (service_home / "models" / broken).glob("*.safetensors"):
        weights.write_bytes(b"\x00garbage, not a safetensors file" * 4)
    body = {**tiny_assets, "dataset": name, "alpha": 0.7, "beta": 0.1, "hyperparameters": SETTINGS}

    workers.ensure_one()
    with client(api, ALICE) as alice, client(api, BOB) as bob:
        bobs = run_job(bob, body, "succeeded", workers)
        mine = run_job(alice, body, "succeeded", workers)
        failed = run_job(alice, {**body, "teacher": broken}, "failed", workers)
        # What a worker writes when the database drops its connection (issue 10, fault 1): the
        # driver's message with its SQL, a traceback, a path under the artifact root.
        artifacts = service_home / "artifacts"
        with transaction(db) as session:
            add_event(
                session,
                failed["id"],
                "train failed: OperationalError: (psycopg.OperationalError) terminating connection due "
                "to administrator command\n[SQL: UPDATE jobs SET heartbeat_at=%(heartbeat_at)s WHERE "
                "jobs.id = %(id_1)s]\n(Background on this error at: https://sqlalche.me/e/20/e3q8)",
                level="error",
                data={
                    "traceback": ["Traceback (most recent call last):", f'  File "{REPO}/worker/tasks.py"'],
                    "checkpoint": str(artifacts / "jobs" / failed["id"] / "checkpoints" / "step-2"),
                    "note": f'Traceback (most recent call last):\n  File "{REPO}/x.py"\nValueError: boom',
                },
            )
        answers = crawl(alice, [mine["id"], failed["id"]])
        # Errors of requests naming paths: outside the roots, missing, a broken model.
        for probe in ("/etc/passwd", "../../../../etc/passwd", str(service_home / "nope")):
            answers.append(alice.post("/v1/jobs", json={**body, "dataset": probe}))
            answers.append(alice.post("/v1/jobs", json={**body, "teacher": probe}))
        answers.append(alice.post("/v1/inspect", json={"teacher": broken, "prompt": "a", "response": "b"}))

        bob_jobs = [j["id"] for j in bob.get("/v1/jobs", params={"limit": 100}).json()["data"]]
        assert bobs["id"] in bob_jobs
        bob_stores = {p["key"]: p for p in bob.get("/v1/precomputes").json()["data"]}

    forbidden = {f"bob's job {i}": i for i in bob_jobs}
    forbidden |= {
        "TVKD_HOME": str(service_home),
        "its real path": str(service_home.resolve()),
        "the repository": str(REPO),
        "site-packages": "site-packages",
        "python": sys.prefix,
    }
    assert_discloses_nothing(answers, forbidden)

    # What is shown instead: names relative to their roots, the failure's exception, no job id.
    events = [e for a in answers if a.request.url.path.endswith("/events") for e in a.json()["data"]]
    reused = [e for e in events if "computed_by" in e["data"] and e["data"].get("cached") is True]
    assert len(reused) == 1 and reused[0]["data"]["computed_by"] is None, reused
    assert "another key's job" in reused[0]["message"], reused[0]
    stored = [e for e in events if "checkpoint" in e["data"] and e["level"] == "error"]
    assert stored[0]["data"]["checkpoint"] == f"jobs/{failed['id']}/checkpoints/step-2", stored
    assert "traceback" not in stored[0]["data"] and stored[0]["data"]["note"] == "ValueError: boom"
    assert stored[0]["message"] == "a database error (details in the server log)"
    failed_now = next(a.json() for a in answers if a.request.url.path == f"/v1/jobs/{failed['id']}")
    assert failed_now["error"]["message"], failed_now
    store = next(p for p in answers[1].json()["data"] if p["key"] in bob_stores)
    assert store["job_id"] is None and bob_stores[store["key"]]["job_id"] == bobs["id"]
    assert not Path(store["fields"]["teacher"]).is_absolute(), store["fields"]
    assert {m["root"] for m in answers[2].json()["data"]} == {"model_roots[0]"}


def probe_pairs(service_home: Path, tiny_assets: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """(existing, missing) pairs of names outside the roots: absolute, through `..`, and through
    a symlink inside a root that points outside. The two names of a pair differ only in their
    last part (`present…` / `absent…`)."""
    outside = service_home / "outside-probe"
    if not outside.exists():
        outside.mkdir()
        shutil.copy(service_home / "data" / tiny_assets["dataset"], outside / "present.jsonl")
        shutil.copytree(service_home / "models" / tiny_assets["teacher"], outside / "present-model")
        (service_home / "data" / "probe-link").symlink_to(outside)
        (service_home / "models" / "probe-link").symlink_to(outside)
    up = "../" * len((service_home / "data").relative_to("/").parts)
    pairs = {
        "dataset": [str(outside / "{}.jsonl"), "../outside-probe/{}.jsonl", "probe-link/{}.jsonl"],
        "teacher": [str(outside / "{}-model"), "../outside-probe/{}-model", "probe-link/{}-model"],
    }
    out = {
        field: [(n.format("present"), n.format("absent")) for n in names] for field, names in pairs.items()
    }
    out["dataset"].append((f"{up}etc/passwd", f"{up}etc/absent"))  # a file that exists on every host
    return out


@pytest.mark.parametrize("field", ["dataset", "teacher"])
def test_paths_outside_the_roots_get_one_answer_whether_they_exist(
    api: str, tiny_assets: dict[str, str], service_home: Path, field: str
) -> None:
    body = {**tiny_assets, "alpha": 0.7, "beta": 0.1}
    with client(api, ALICE) as alice:
        for existing, missing in probe_pairs(service_home, tiny_assets)[field]:
            answers = {}
            for name in (existing, missing):
                r = alice.post("/v1/jobs", json={**body, field: name})
                assert r.status_code == 422, r.text
                answers[name] = json.dumps(r.json()["error"])
            same = {name: text.replace(name.rsplit("/", 1)[-1], "<leaf>") for name, text in answers.items()}
            assert same[existing] == same[missing], answers
            assert str(service_home) not in answers[existing], answers  # nor a path of the server


def test_a_lone_slash_in_a_message_is_not_taken_for_a_path(tmp_path: Path) -> None:
    """ "'chosen'/'rejected'" reached API clients as "'chosen'…'rejected'"; paths are still hidden."""
    from service.disclosure import Redactor

    redactor = Redactor([(tmp_path, "<data root>")])
    assert redactor.text("no 'chosen'/'rejected' columns") == "no 'chosen'/'rejected' columns"
    assert redactor.text("a / b and 1 / 2") == "a / b and 1 / 2"
    assert redactor.text(f"cannot read {tmp_path}/d/x.jsonl.") == "cannot read d/x.jsonl."
    assert redactor.text("cannot read /etc/secret/x.json") == "cannot read …/x.json"
