"""The Compare page against the real API: TVKD (α = 0.7) against DPO (α = 0), curves overlaid
per metric and the final metrics side by side, from the jobs' results."""

from __future__ import annotations

import json

from dashboard_helpers import Jobs, no_exceptions, open_page


def test_tvkd_against_dpo(jobs: Jobs, dashboard_env: str) -> None:
    ids = [jobs.tvkd["id"], jobs.dpo["id"]]
    at = open_page("compare", jobs=ids)
    no_exceptions(at)
    assert at.multiselect(key="compare:jobs").value == ids
    figs = {
        json.loads(e.proto.spec)["layout"]["title"]["text"]: json.loads(e.proto.spec)
        for e in at.get("plotly_chart")
    }
    assert {"rewards/margins (train)", "rewards/accuracies (train)", "loss (train)"} <= set(figs)
    names = [t["name"] for t in figs["rewards/margins (train)"]["data"]]
    assert len(names) == 2 and names[0].startswith("α=0.7") and names[1].startswith("α=0 ")
    table = at.dataframe[0].value.set_index("job")
    for job in jobs.finished:
        assert table.loc[job["id"], "α"] == job["alpha"]
        assert table.loc[job["id"], "rewards/margins"] == job["result"]["metrics"]["rewards/margins"]

    at.radio(key="compare:split").set_value("eval").run()
    no_exceptions(at)
    titles = [json.loads(e.proto.spec)["layout"]["title"]["text"] for e in at.get("plotly_chart")]
    assert "rewards/margins (eval)" in titles
    table = at.dataframe[0].value.set_index("job")
    for job in jobs.finished:
        evals = job["result"]["eval_metrics"]
        assert table.loc[job["id"], "rewards/accuracies"] == evals["rewards/accuracies"]


def test_defaults_to_the_newest_succeeded_jobs(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("compare")
    no_exceptions(at)
    chosen = at.multiselect(key="compare:jobs").value
    assert set(chosen) >= {jobs.tvkd["id"], jobs.dpo["id"]}
    assert jobs.waiting["id"] not in chosen
