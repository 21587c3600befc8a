"""The Job page against the real API: a finished job's header, stage timeline, curves (loss and
rewards/margins first, the DPO note beside chosen/rejected, the tvkd/* shaping curves), event
log, checkpoints and model folder; cancelling a waiting job; an unknown id."""

from __future__ import annotations

import json
from typing import Any

from dashboard_helpers import Jobs, client, job_body, no_exceptions, open_page, texts


def figures(at: Any) -> list[dict[str, Any]]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def title(fig: dict[str, Any]) -> str:
    t = fig.get("layout", {}).get("title", {})
    return t.get("text", "") if isinstance(t, dict) else str(t)


def frame_with(at: Any, column: str) -> Any:
    """The (first) table on the page that has `column`."""
    return next(e.value for e in at.dataframe if column in e.value.columns)


def test_finished_job(jobs: Jobs, dashboard_env: str) -> None:
    job = jobs.tvkd
    at = open_page("job", job=job["id"])
    no_exceptions(at)
    text = texts(at)
    assert f"`{job['id']}` :green-badge[succeeded]" in text
    assert "| `evaluate` | 1/1 | — | 0.7 | 0.1 | `teacher` | `student` | `tasks.jsonl` |" in text

    figs = figures(at)
    titles = [title(f) for f in figs]
    # Curves in reading order: loss, then the reward margin first among the rewards.
    assert titles[:4] == [
        "Loss",
        "Reward margin (chosen − rejected)",
        "Reward accuracy",
        "Rewards of chosen and rejected",
    ]
    traces = {t["name"]: t for f in figs for t in f["data"] if "name" in t}
    assert traces["loss (train)"]["x"] == [1, 2, 3, 4]
    assert {"rewards/chosen (train)", "rewards/rejected (train)", "rewards/margins (eval)"} <= set(traces)
    assert any(name.startswith("tvkd/shaping_chosen") for name in traces)
    assert any(name.startswith("tvkd/shaping_accuracy") for name in traces)
    assert "falling `rewards/chosen` while `rewards/margins` grows is normal DPO behaviour" in text
    # The precompute's teacher check (split "teacher") in words beside the shaping curves.
    assert (
        "Teacher check: Σψ ranks chosen above rejected in" in text and "training pairs (95% interval" in text
    )
    # The stage timeline: a bar per stage, in the order they ran.
    timeline = next(f for f in figs if f["layout"].get("xaxis", {}).get("type") == "date")
    stages = [t["y"][0] for t in timeline["data"]]
    assert stages[:2] == ["validate", "precompute"] and "train" in stages and stages[-1] == "evaluate"

    events = frame_with(at, "message")
    assert "job submitted" in list(events["message"])
    assert set(events["stage"]) >= {"validate", "precompute", "train", "evaluate"}
    assert any(m.startswith("reference started") for m in events["message"])  # a step of train
    assert list(frame_with(at, "path")["step"]) == [2, 4]
    assert job["model_path"] in [c.value for c in at.code]
    # The model to take away: the command, and its files with sizes and hashes.
    assert f"tvkd download {job['id']} ./{job['id']}-model" in [c.value for c in at.code]
    files = frame_with(at, "sha256")
    assert "model.safetensors" in list(files["file"]) and all(len(h) == 64 for h in files["sha256"])
    assert "--checkpoint 4`" in text
    (cancel,) = [b for b in at.button if b.label == "Cancel job"]
    assert cancel.disabled


def test_cancel_a_waiting_job(jobs: Jobs, api: str, tiny_assets: dict[str, str], dashboard_env: str) -> None:
    # No worker runs any more (the jobs fixture stopped them): this job waits until cancelled.
    with client(api) as c:
        job_id = c.post("/v1/jobs", json=job_body(tiny_assets, 0.7)).json()["id"]
    at = open_page("job", job=job_id)
    no_exceptions(at)
    assert ":blue-badge[validating]" in texts(at)
    assert at.get("progress"), "a running job shows its progress bar"
    (cancel,) = [b for b in at.button if b.label == "Cancel job"]
    assert not cancel.disabled
    cancel.click().run()
    no_exceptions(at)
    assert "Cancel requested: cancelled" in texts(at)
    with client(api) as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_unknown_job(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("job", job="job_000000000000000000000000")
    no_exceptions(at)
    assert "No job `job_000000000000000000000000` for this key" in texts(at)


def test_a_chain_of_jobs_is_shown_on_each_of_its_pages(
    jobs: Jobs, api: str, tiny_assets: dict[str, str], dashboard_env: str
) -> None:
    # No worker runs: a DPO job on the finished TVKD job's model is released at once (validating);
    # a distillation naming that DPO job's model waits for it.
    with client(api) as c:
        first = jobs.tvkd["id"]
        body = {"kind": "dpo", "student": f"job:{first}", "dataset": tiny_assets["dataset"]}
        dpo = c.post("/v1/jobs", json=body).json()
        body = {**job_body(tiny_assets, 0.7), "teacher": f"job:{dpo['id']}", "student": f"job:{first}"}
        last = c.post("/v1/jobs", json=body).json()
    assert dpo["status"] == "validating" and last["status"] == "waiting"

    at = open_page("job", job=last["id"])
    no_exceptions(at)
    text = texts(at)
    assert f"`{last['id']}` :orange-badge[waiting] · tvkd" in text
    assert f"Waiting for teacher `{dpo['id']}`" in text
    chain = frame_with(at, "role")
    assert list(chain["job"]) == [first, dpo["id"], last["id"]]
    assert list(chain["role"]) == [f"student of {dpo['id'][:12]}…", "its teacher", "this job"]
    assert list(chain["kind"]) == ["tvkd", "dpo", "tvkd"]

    at = open_page("job", job=first)  # the head of the chain lists who uses its model
    no_exceptions(at)
    users = frame_with(at, "role")
    assert {"uses its model as student"} == set(users["role"][users["job"] != first])
    assert {dpo["id"], last["id"]} <= set(users["job"])
    with client(api) as c:  # cancelling the DPO job fails the one waiting for it
        assert c.post(f"/v1/jobs/{dpo['id']}/cancel").status_code == 200
        after = c.get(f"/v1/jobs/{last['id']}").json()
    assert after["status"] == "failed" and after["error"]["code"] == "dependency_failed"


def test_answers_before_beside_after(jobs: Jobs, api: str, dashboard_env: str) -> None:
    # The TVKD job set gen_prompts=2 and a reward model: its Answers tab shows both answers to
    # each held-out prompt, scored, and the gen/* metrics before → after.
    with client(api) as c:
        want = c.get(f"/v1/jobs/{jobs.tvkd['id']}/generations").json()
    at = open_page("job", job=jobs.tvkd["id"])
    no_exceptions(at)
    table = frame_with(at, "gold before")
    assert len(table) == 2
    assert list(table["before"]) == [g["before"]["text"] for g in want["data"]]
    assert list(table["after"]) == [g["after"]["text"] for g in want["data"]]
    assert set(table["gold after"]) <= {"✓", "✗"} and set(table["win"]) == {"—"}  # no teacher reference
    metrics = next(e.value for e in at.dataframe if {"metric", "before", "after"} <= set(e.value.columns))
    gen = metrics[metrics["metric"].str.startswith("gen/")]
    assert list(gen["metric"]) == ["gen/gold_accuracy", "gen/reward"]
    # A job without generation evaluation says how to turn it on.
    at = open_page("job", job=jobs.dpo["id"])
    no_exceptions(at)
    assert "the evaluate stage answers held-out prompts when the job sets `gen_prompts`" in texts(at)
