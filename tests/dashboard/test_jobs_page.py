"""The Jobs page against the real API: the key's jobs with status, progress, α/β and models,
the status filter, cursor paging, and auto-refresh while a job runs."""

from __future__ import annotations

import pytest
from dashboard_helpers import BOB, Jobs, client, job_body, no_exceptions, open_page, texts


def job_ids(at) -> list[str]:  # type: ignore[no-untyped-def]
    frame = at.dataframe[0].value
    return [link.split("=", 1)[1] for link in frame["job"]]


def test_lists_jobs_with_status_progress_and_settings(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("jobs")
    no_exceptions(at)
    frame = at.dataframe[0].value.set_index("job")
    for job in jobs.finished:
        row = frame.loc[f"job?job={job['id']}"]
        assert row["status"] == "succeeded"
        assert row["progress"] == 1.0
        assert row["α"] == job["alpha"] and row["β"] == 0.1
        assert row["teacher"] == "teacher" and row["student"] == "student"
        assert row["finished"].endswith("UTC")
        assert row["tokens"] == f"inspector?job={job['id']}"
    assert frame.loc[f"job?job={jobs.tvkd['id']}"]["α"] == 0.7
    assert frame.loc[f"job?job={jobs.dpo['id']}"]["α"] == 0.0
    waiting = frame.loc[f"job?job={jobs.waiting['id']}"]
    assert waiting["finished"] == "—"
    # A job still waiting for a worker keeps the page refreshing.
    assert "running: refreshing every" in texts(at)


def test_status_filter(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("jobs")
    at.selectbox(key="jobs:status").set_value("succeeded").run()
    no_exceptions(at)
    ids = job_ids(at)
    assert jobs.tvkd["id"] in ids and jobs.dpo["id"] in ids
    assert jobs.waiting["id"] not in ids
    assert set(at.dataframe[0].value["status"]) == {"succeeded"}
    assert "not refreshed automatically" in texts(at)

    # Other tests of this session may leave failed jobs for the same key (a chain whose first job
    # fails): the filter must show exactly those, and none of the jobs above.
    at.selectbox(key="jobs:status").set_value("failed").run()
    no_exceptions(at)
    if at.dataframe:
        failed = job_ids(at)
        assert set(at.dataframe[0].value["status"]) == {"failed"}
        assert not {jobs.tvkd["id"], jobs.dpo["id"], jobs.waiting["id"]} & set(failed)
    else:
        assert "No jobs with status `failed`" in texts(at)


def test_pages_through_jobs_and_opens_one(
    jobs: Jobs, api: str, tiny_assets: dict[str, str], dashboard_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BOB's own jobs (no worker runs any more: they wait), so ALICE's tests see none of them.
    with client(api, BOB) as c:
        created = [c.post("/v1/jobs", json=job_body(tiny_assets, 0.7)).json()["id"] for _ in range(6)]
    monkeypatch.setenv("TVKD_API_KEY", BOB)
    at = open_page("jobs")
    at.selectbox(key="jobs:size").set_value(5).run()
    first = job_ids(at)
    assert first == created[::-1][:5]  # newest first
    assert "Page 1 · 5 jobs" in texts(at)

    at.button(key="jobs:next").click().run()
    no_exceptions(at)
    assert job_ids(at) == created[:1]
    assert "Page 2 · 1 jobs" in texts(at)

    at.button(key="jobs:prev").click().run()
    assert job_ids(at) == first

    # "Open" goes to the job's page with ?job= set.
    at.selectbox(key="jobs:open").set_value(first[1]).run()
    at.button(key="jobs:open-job").click().run()
    no_exceptions(at)
    assert at.query_params.get("job") == first[1]
    assert f"`{first[1]}`" in texts(at)
