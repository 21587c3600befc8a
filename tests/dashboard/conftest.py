"""Fixtures of the dashboard tests: the service tests' real API, worker and Redis fixtures
(tests/service/conftest.py, reused, not copied), on SQLite only, and real tiny jobs run to
completion once per session.

pytest allows `pytest_plugins` only in the top-level conftest, so the service conftest is loaded
from its file under a module name of its own (dashboard_helpers.service) and its names are
re-exported here: fixtures are found by name in a conftest's namespace. They are separate
fixture definitions from the ones tests/service sees, so a whole-suite run gives the dashboard
tests their own API process, Redis database and SQLite file. Re-exporting every public name also
keeps `from conftest import …` in tests/service working when pytest happens to have loaded this
conftest last.
"""

from __future__ import annotations

from typing import Any

import pytest
from dashboard_helpers import ALICE, Jobs, client, job_body, service, wait_for

globals().update({k: v for k, v in vars(service).items() if not k.startswith("_") and k not in globals()})

JOB_TIMEOUT = 150.0


@pytest.fixture(scope="session")
def backend() -> str:
    """SQLite only: the dashboard reads the API over HTTP, and the API's behaviour on both
    databases is the service tests' business; one backend keeps this suite fast."""
    return "sqlite"


@pytest.fixture(scope="session")
def jobs(api: str, workers: Any, tiny_assets: dict[str, str]) -> Jobs:
    """A TVKD job (α = 0.7) and a DPO job (α = 0) run to completion by a real worker; then the
    workers stop, so that a third job stays waiting (a running job, for the refresh tests) and
    the rest of the suite has both CPU cores."""
    workers.start()
    with client(api) as c:
        ids = []
        for alpha in (0.7, 0.0):
            # The TVKD job also answers its held-out prompts before and after (the Answers tab).
            gen = {"gen_prompts": 2, "gen_max_new_tokens": 4, "reward_model": "rm"} if alpha else {}
            r = c.post("/v1/jobs", json=job_body(tiny_assets, alpha, **gen))
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

        def finished() -> list[dict[str, Any]] | None:
            current = [c.get(f"/v1/jobs/{i}").json() for i in ids]
            return current if all(j["finished_at"] for j in current) else None

        done = wait_for(finished, timeout=JOB_TIMEOUT, interval=0.5, what="the dashboard's jobs to finish")
        if any(j["status"] != "succeeded" for j in done):
            logs = "\n".join(p.tail(60) for p in workers.procs)
            pytest.fail(
                f"a job did not succeed: {[(j['id'], j['status'], j['error']) for j in done]}\n{logs}"
            )
        workers.stop_all()
        r = c.post("/v1/jobs", json=job_body(tiny_assets, 0.5))
        assert r.status_code == 201, r.text
        return Jobs(tvkd=done[0], dpo=done[1], waiting=r.json())


@pytest.fixture
def dashboard_env(api: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The dashboard (in this process, under AppTest) pointed at the test API with ALICE's key."""
    monkeypatch.setenv("TVKD_API_URL", api)
    monkeypatch.setenv("TVKD_API_KEY", ALICE)
    monkeypatch.setenv("TVKD_DASHBOARD_TIMEOUT", "30")
    return api
