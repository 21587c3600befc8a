"""Job: one job's state, stage timeline, metric curves, event log, checkpoints, the answers to
held-out prompts before beside after training (with `gen_prompts`) and model folder, with a
cancel button; refreshed every few seconds while it runs."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, connection
from dashboard.api_client import ApiClient, ApiError
from dashboard.formatting import badge, duration, is_active, number, progress_text, when
from dashboard.paging import CursorPager
from dashboard.widgets import INSPECTOR_PAGE, job_picker, live

# Curves in the order an engineer reads a DPO run: is it learning (loss, margin), does it rank
# pairs right, how do the two rewards move, what does the teacher's shaping contribute.
REWARD_NOTE = (
    "A falling `rewards/chosen` while `rewards/margins` grows is normal DPO behaviour: the loss only "
    "asks chosen to beat rejected, and both log-ratios often fall, rejected faster."
)
CURVES: list[tuple[str, list[str], str | None]] = [
    ("Loss", ["loss"], None),
    ("Reward margin (chosen − rejected)", ["rewards/margins"], None),
    ("Reward accuracy", ["rewards/accuracies"], None),
    ("Rewards of chosen and rejected", ["rewards/chosen", "rewards/rejected"], REWARD_NOTE),
]
SHAPING_NOTE = (
    "TVKD's teacher shaping: α·Σψ per response and how often Σψ alone ranks the pair as the data does."
)
EVENTS_PER_PAGE = 100


def cell(text: str) -> str:
    """A name as a markdown table cell: in code style, with what would break the table removed."""
    return "`" + str(text).replace("`", "'").replace("|", "¦").replace("\n", " ") + "`"


def optional(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def header(job: dict[str, Any]) -> None:
    kind = job.get("kind") or "tvkd"
    st.markdown(f"### `{job['id']}` {badge(job['status'])} · {kind}")
    p = job.get("progress") or {}
    if is_active(job):
        st.progress(p.get("fraction") or 0.0, text=progress_text(job))
    eta = duration(p.get("eta_seconds")) if is_active(job) else "—"
    done = f"{p.get('done', 0)}/{p.get('total', 0)}" if p.get("total") else "—"
    st.markdown(
        "| stage | done | ETA | α | β | teacher | student | dataset |\n|---|---|---|---|---|---|---|---|\n"
        f"| {cell(job['stage'])} | {done} | {eta} | {optional(job.get('alpha'))} | "
        f"{optional(job.get('beta'))} | {cell(job['teacher']) if job.get('teacher') else '—'} | "
        f"{cell(job['student'])} | {cell(job['dataset'])} |"
    )
    st.caption(
        f"created {when(job.get('created_at'))} · started {when(job.get('started_at'))} · "
        f"finished {when(job.get('finished_at'))}"
    )
    for warning in job.get("warnings") or []:
        st.warning(warning)
    if job.get("error"):
        st.error(f"**{job['error']['code']}**: {job['error']['message']}")
    if job.get("model_path"):
        st.markdown("**Model folder** (a Hugging Face folder, relative to the API's artifact root):")
        st.code(job["model_path"], language=None)


def chain_rows(client: ApiClient, job: dict[str, Any], recent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pipeline around `job`: the jobs whose models it uses (`depends_on`, followed up the
    chain), then the jobs among `recent` that use its model, each with its role and status."""
    rows: list[dict[str, Any]] = []
    seen = {job["id"]}

    def up(j: dict[str, Any], depth: int) -> None:
        for field, ref in (j.get("depends_on") or {}).items():
            if ref in seen:
                continue
            seen.add(ref)
            try:
                other = client.get_job(ref)
            except ApiError:
                other = {"id": ref, "kind": "?", "status": "unknown"}
            up(other, depth + 1)
            rows.append(_row(other, f"{field} of {j['id'][:12]}…" if depth else f"its {field}"))

    up(job, 0)
    rows.append(_row(job, "this job"))
    for other in recent:
        for field, ref in (other.get("depends_on") or {}).items():
            if ref == job["id"] and other["id"] not in seen:
                seen.add(other["id"])
                rows.append(_row(other, f"uses its model as {field}"))
    return rows


def _row(job: dict[str, Any], role: str) -> dict[str, Any]:
    return {
        "role": role,
        "job": job["id"],
        "kind": job.get("kind") or "tvkd",
        "status": job.get("status"),
        "model": job.get("model_path"),
    }


def chain(client: ApiClient, job: dict[str, Any]) -> None:
    """The pipeline this job is part of (`job:<id>` references), when it is part of one."""
    recent = client.list_jobs(limit=100).get("data", [])
    rows = chain_rows(client, job, recent)
    if len(rows) == 1:
        return
    st.markdown("**Pipeline** (jobs whose models this one uses, and those that use its model)")
    if job["status"] == "waiting":
        named = ", ".join(f"{f} `{r}`" for f, r in (job.get("depends_on") or {}).items())
        st.info(f"Waiting for {named} to succeed.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def cancel_button(client: ApiClient, job: dict[str, Any]) -> None:
    active = is_active(job) and job["status"] != "cancelling"
    if st.button("Cancel job", key=f"cancel:{job['id']}", disabled=not active, type="secondary"):
        try:
            after = client.cancel_job(job["id"])
            st.session_state[f"cancelled:{job['id']}"] = after["status"]
        except ApiError as exc:
            if exc.status != 409:
                raise
            st.session_state[f"cancelled:{job['id']}"] = f"not cancelled: {exc.message}"
        st.rerun()
    outcome = st.session_state.get(f"cancelled:{job['id']}")
    if outcome:
        st.info(f"Cancel requested: {outcome}.")


def timeline(client: ApiClient, job: dict[str, Any]) -> None:
    events, truncated = client.all_events(job["id"])
    spans = charts.stage_spans(events, job.get("finished_at"))
    fig = charts.timeline_figure(spans)
    if fig is None:
        st.caption("No events yet.")
        return
    st.plotly_chart(fig, key="timeline", config={"displayModeBar": False})
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "stage": s.stage,
                    "started": when(s.start.isoformat()),
                    "took": duration((s.end - s.start).total_seconds()),
                    "events": s.events,
                    "worst level": s.level,
                }
                for s in spans
            ]
        ),
        hide_index=True,
    )
    if truncated:
        st.caption("The timeline shows the first 10,000 events.")


def curves(client: ApiClient, job: dict[str, Any]) -> None:
    series = charts.index_series(client.metric_series(job["id"]))
    if not series:
        st.caption("No metrics yet: they appear once training logs its first step.")
        return
    for i, (title, names, note) in enumerate(CURVES):
        if i % 2 == 0:
            row = st.columns(2)  # a row at a time, so the page reads left to right, top to bottom
        fig = charts.metric_figure(series, names, title)
        with row[i % 2]:
            if fig is not None:
                st.plotly_chart(fig, key=f"curve:{title}")
            if note:
                st.caption(note)
    shaping = [n for n in charts.names_in(series) if n.startswith("tvkd/") and n != "tvkd/gradient_scale"]
    check = teacher_check_text(series)
    if shaping or check:
        st.markdown("**Teacher shaping (`tvkd/*`)**")
        st.caption(SHAPING_NOTE)
        if check:
            st.caption(check)
        left, right = st.columns(2)
        sums = [n for n in shaping if "accuracy" not in n and "ties" not in n]
        accs = [n for n in shaping if "accuracy" in n or "ties" in n]
        for column, names, title in ((left, sums, "α·Σψ per response"), (right, accs, "Shaping accuracy")):
            fig = charts.metric_figure(series, names, title)
            if fig is not None:
                column.plotly_chart(fig, key=f"curve:{title}")
    shown = {n for _, names, _ in CURVES for n in names} | set(shaping)
    others = [
        n for n in charts.names_in(series) if n not in shown and n != "pairs" and not n.startswith("teacher/")
    ]
    if others:
        with st.expander("Other metrics (" + ", ".join(others) + ")"):
            for name in others:
                fig = charts.metric_figure(series, [name], name)
                if fig is not None:
                    st.plotly_chart(fig, key=f"curve:{name}")


def teacher_check_text(series: charts.Series) -> str | None:
    """The precompute's teacher check (split "teacher", MATH.md "Metrics") in one line, or None."""

    def value(name: str) -> float | None:
        point = series.get(("teacher", f"teacher/{name}"))
        return point[1][-1] if point and point[1] else None

    accuracy, low, high, pairs = (value(n) for n in ("shaping_accuracy", "shaping_accuracy_low",
                                                      "shaping_accuracy_high", "pairs"))  # fmt: skip
    if accuracy is None or low is None or high is None:
        return None
    text = (
        f"Teacher check: Σψ ranks chosen above rejected in {accuracy:.1%} of {pairs or 0:.0f} training pairs "
    )
    text += f"(95% interval {low:.1%}–{high:.1%})"
    if low <= 0.5 <= high:
        text += ": no better than chance, the teacher's values carry no measurable preference here."
    return text


def event_log(client: ApiClient, job: dict[str, Any]) -> None:
    pager = CursorPager(f"events:{job['id']}", EVENTS_PER_PAGE)
    page = client.events(job["id"], after=pager.after, limit=EVENTS_PER_PAGE)
    rows = [
        {
            "time": when(e["created_at"]),
            "level": e["level"],
            "stage": e.get("stage") or "",
            "message": e["message"],
            "data": json.dumps(e["data"], ensure_ascii=False) if e.get("data") else "",
        }
        for e in page["data"]
    ]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="events")
    else:
        st.caption("No events.")
    pager.controls(page, noun="events")


def checkpoint_list(client: ApiClient, job: dict[str, Any]) -> None:
    pager = CursorPager(f"checkpoints:{job['id']}", 20)
    page = client.checkpoints(job["id"], after=pager.after, limit=20)
    if not page["data"]:
        st.caption("No checkpoints yet (`save_every` sets how often they are written).")
    else:
        rows = [{"step": c["step"], "path": c["path"], "saved": when(c["created_at"])} for c in page["data"]]
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="checkpoints")
        st.caption("Paths are relative to the API's artifact root; older checkpoints may have been pruned.")
        step = page["data"][-1]["step"]
        st.caption(
            f"Take one away (its weights with the student's configuration and tokenizer): "
            f"`tvkd download {job['id']} ./{job['id']}-step{step} --checkpoint {step}`"
        )
    pager.controls(page, noun="checkpoints")


def download(client: ApiClient, job: dict[str, Any]) -> None:
    """The trained model to take away: `tvkd download` (hashes checked, resumable), or its files
    and their tar over the API (GET /v1/jobs/{id}/model)."""
    try:
        listing = client.model_files(job["id"])
    except ApiError:  # no model folder (yet)
        return
    with st.expander("Download the model"):
        st.code(f"tvkd download {job['id']} ./{job['id']}-model", language="bash")
        rows = [{"file": f["name"], "bytes": f["size"], "sha256": f["sha256"]} for f in listing["files"]]
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="model_files")
        st.caption(
            f"{listing['total_bytes']:,} bytes. `tvkd download` checks every file's sha256, resumes a "
            "broken download and leaves a folder `AutoModelForCausalLM.from_pretrained` loads. Over HTTP "
            f"(with your API key): each file at `{client.base_url}/v1/jobs/{job['id']}/model/FILE` "
            "(Range requests resume), or all of it as one tar at "
            f"`{client.base_url}{listing['archive_url']}`."
        )


GEN_METRICS = ("gen/gold_accuracy", "gen/reward", "gen/teacher_reward", "gen/win_rate")
ANSWERS_PER_PAGE = 20


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages: the last user turn is the question
        return str(prompt[-1].get("content", "")) if prompt else ""
    return str(prompt)


def _verdict(gold: bool | None) -> str:
    return "—" if gold is None else ("✓" if gold else "✗")


def answers(client: ApiClient, job: dict[str, Any]) -> None:
    """The evaluate stage's greedy answers to held-out prompts, before beside after, scored."""
    pager = CursorPager(f"answers:{job['id']}", ANSWERS_PER_PAGE)
    try:
        page = client.generations(job["id"], after=pager.after, limit=ANSWERS_PER_PAGE)
    except ApiError as exc:
        if exc.status != 404:
            raise
        st.caption(
            "No answers: the evaluate stage answers held-out prompts when the job sets `gen_prompts` "
            "(scored by the dataset's gold checker, `reward_model` and the teacher's implicit reward)."
        )
        return
    rows = [
        {"metric": name, "before": number(page["before"].get(name)), "after": number(page["after"].get(name))}
        for name in GEN_METRICS
        if name in page["before"] or name in page["after"]
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="gen-metrics")
    scorers = ", ".join(f"{k}: {v}" for k, v in page["scorers"].items() if v) or "none"
    st.caption(
        f"Greedy answers (at most {page['max_new_tokens']} new tokens) of the student before training "
        f"and at step {page['step']}. Scorers: {scorers}. Gold ✓/✗: the dataset's checker; "
        "win: the teacher ranks the answer after above the one before (½ a tie)."
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "prompt": _prompt_text(g["prompt"]),
                    "before": g["before"]["text"],
                    "gold before": _verdict(g["before"]["gold"]),
                    "reward before": number(g["before"]["reward"]),
                    "after": g["after"]["text"],
                    "gold after": _verdict(g["after"]["gold"]),
                    "reward after": number(g["after"]["reward"]),
                    "teacher reward before → after": (
                        f"{number(g['before']['teacher_reward'])} → {number(g['after']['teacher_reward'])}"
                    ),
                    "win": number(g["win"]),
                }
                for g in page["data"]
            ]
        ),
        hide_index=True,
        key="answers",
    )
    pager.controls(page, noun="answers")


def final_metrics(job: dict[str, Any]) -> None:
    result = job.get("result") or {}
    rows = []
    for split, key in (("train (last step)", "metrics"), ("eval", "eval_metrics")):
        for name, value in (result.get(key) or {}).items():
            rows.append({"split": split, "metric": name, "value": number(value, 6)})
    if rows:
        with st.expander("Final metrics"):
            st.dataframe(pd.DataFrame(rows), hide_index=True)


def show(client: ApiClient, job_id: str) -> bool:
    job = client.get_job(job_id)
    header(job)
    chain(client, job)
    cancel_button(client, job)
    if job.get("model_path"):
        download(client, job)
    final_metrics(job)
    tabs = st.tabs(["Curves", "Timeline", "Events", "Checkpoints", "Answers", "Settings"])
    with tabs[0]:
        curves(client, job)
    with tabs[1]:
        timeline(client, job)
    with tabs[2]:
        event_log(client, job)
    with tabs[3]:
        checkpoint_list(client, job)
    with tabs[4]:
        answers(client, job)
    with tabs[5]:
        st.json({"hyperparameters": job["hyperparameters"], "metadata": job["metadata"]}, expanded=False)
    return is_active(job)


def main(client: ApiClient) -> None:
    st.title("Job")
    job = job_picker(client)
    if job is None:
        return
    if st.button("Token inspector", icon=":material/manage_search:", key="to-inspector"):
        st.switch_page(INSPECTOR_PAGE, query_params={"job": job["id"]})
    live(is_active(job), lambda: show(client, job["id"]), key=f"job:{job['id']}")


connection.run_page(main)
