"""The default `tvkd demo` pipeline in a reduced form (the `tiny` scale: a few steps on a small
task world) through the real API and a real worker: six jobs chained by `job:<id>`, all succeed,
the table has its rows and columns, and a second submission reuses every job."""

from __future__ import annotations

from typing import Any

from conftest import WorkerPool, client

from tvkd.cli import demo_pipeline as dp


def test_the_demo_pipeline_runs_as_six_chained_jobs(api: str, workers: WorkerPool, service_home: Any) -> None:
    scale = dp.SCALES["tiny"]
    assets = dp.prepare_assets(service_home, scale)
    workers.ensure_one()
    with client(api) as c:
        jobs = dp.submit(c, assets, scale, split="dev")
        names = [j.name for j in jobs]
        assert names == [
            "teacher SFT", "teacher DPO", "student SFT", "DPO (α 0)", "TVKD (α 0.7, paper)", "recommended"
        ]  # fmt: skip
        ids = {j.name: j.id for j in jobs}
        first = {j.name: c.get(f"/v1/jobs/{j.id}").json() for j in jobs}
        state = dp.follow(c, jobs, every=30)
        rows = dp.collect(c, jobs, state)
        again = dp.submit(c, assets, scale, split="dev")
    # The chain, as the API (and so the dashboard) records it.
    assert first["teacher DPO"]["depends_on"] == {"student": ids["teacher SFT"]}
    assert first["DPO (α 0)"]["depends_on"] == {"student": ids["student SFT"]}
    assert first["TVKD (α 0.7, paper)"]["depends_on"] == {
        "teacher": ids["teacher DPO"], "student": ids["student SFT"]
    }  # fmt: skip
    assert first["recommended"]["depends_on"] == {
        "teacher": ids["teacher DPO"], "student": ids["student SFT"], "teacher_reference": ids["teacher SFT"]
    }  # fmt: skip
    kinds = {name: s["kind"] for name, s in state.items()}
    assert kinds == {
        "teacher SFT": "sft", "teacher DPO": "dpo", "student SFT": "sft",
        "DPO (α 0)": "dpo", "TVKD (α 0.7, paper)": "tvkd", "recommended": "tvkd",
    }  # fmt: skip
    hp = state["recommended"]["hyperparameters"]
    assert (hp["q_source"], hp["sft_weight"], state["recommended"]["alpha"]) == ("implicit", 1.0, 0.7)
    assert state["TVKD (α 0.7, paper)"]["hyperparameters"]["q_source"] == "logits"
    assert all(s["status"] == "succeeded" for s in state.values()), {n: s["error"] for n, s in state.items()}
    # The table: the teacher's two rows, the student's SFT row, then the three distilled jobs.
    assert [r["job"] for r in rows] == [
        "teacher SFT", "teacher DPO", "student SFT",
        "student DPO (α 0)", "student TVKD (α 0.7, paper)", "student recommended",
    ]  # fmt: skip
    assert all(tuple(r) == dp.COLUMNS for r in rows)
    distilled = rows[3:]
    for r in [rows[1], *distilled]:
        assert 0.0 <= r["gold before"] <= 1.0 and 0.0 <= r["gold after"] <= 1.0, r
        assert r["change"] == r["gold after"] - r["gold before"]
        assert 0.0 <= r["held-out rewards/acc"] <= 1.0
    # "before" is the SFT student for all three (same model, same prompts, greedy).
    assert len({r["gold before"] for r in distilled}) == 1
    assert rows[0]["gold after"] == rows[1]["gold before"]  # the teacher SFT model, judged by the DPO job
    assert rows[2]["gold after"] == distilled[0]["gold before"]  # the student SFT model
    assert distilled[0]["teacher shaping acc"] is None  # no teacher in a DPO job
    for r in distilled[1:]:
        assert 0.0 <= r["teacher shaping acc"] <= 1.0
    assert dp.verdict(rows).startswith(("Ended above", "No distilled student"))
    table = dp.render(rows).splitlines()
    assert table[0].split(" | ")[0].strip() == "job" and len(table) == 2 + len(rows)
    # A second run: every job comes back from its Idempotency-Key, nothing new is made.
    assert [(j.id, j.reused) for j in again] == [(ids[n], True) for n in names]
