"""Compare: the curves of several jobs on shared axes and their final metrics side by side, e.g.
an α sweep, or TVKD against plain DPO (α = 0) on the same data."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, connection
from dashboard.api_client import ApiClient
from dashboard.formatting import job_label, settings_text, short_id
from dashboard.widgets import recent_jobs

DEFAULT_METRICS = ("rewards/margins", "rewards/accuracies", "loss", "tvkd/shaping_accuracy")
DEFAULT_JOBS = 4
RESULT_KEYS = {"eval": "eval_metrics", "train": "metrics"}


def trace_label(job: dict[str, Any]) -> str:
    return f"{settings_text(job)} · {short_id(job['id'], 8)}"


def final_table(jobs: list[dict[str, Any]], split: str, names: list[str]) -> pd.DataFrame:
    """One row per job: its settings and the final metrics of `split` from its result."""
    rows = []
    for job in jobs:
        metrics = (job.get("result") or {}).get(RESULT_KEYS[split]) or {}
        row: dict[str, Any] = {"job": job["id"], "α": job["alpha"], "β": job["beta"], "status": job["status"]}
        for name in names:
            row[name] = metrics.get(name)
        rows.append(row)
    return pd.DataFrame(rows)


def main(client: ApiClient) -> None:
    st.title("Compare jobs")
    jobs = recent_jobs(client)
    by_id = {j["id"]: j for j in jobs}
    wanted = [i for i in st.query_params.get_all("jobs") if i in by_id]
    default = wanted or [j["id"] for j in jobs if j["status"] == "succeeded"][:DEFAULT_JOBS]
    chosen = st.multiselect(
        "Jobs",
        list(by_id),
        default=default,
        format_func=lambda i: job_label(by_id[i]),
        key="compare:jobs",
        help="Any of the newest jobs; an α sweep or TVKD against DPO (α = 0) on the same data.",
    )
    if not chosen:
        st.info("Pick two or more jobs to compare.")
        return
    split = st.radio("Split", ["train", "eval"], horizontal=True, key="compare:split")
    per_job = [
        (trace_label(by_id[i]), charts.index_series(client.metric_series(i, split=split))) for i in chosen
    ]
    available = sorted({name for _, s in per_job for _, name in s})
    metrics = st.multiselect(
        "Metrics",
        available,
        default=[m for m in DEFAULT_METRICS if m in available],
        key=f"compare:metrics:{split}",
    )
    cols = st.columns(2)
    drawn = 0
    for name in metrics:
        fig = charts.overlay_figure(per_job, name, split)
        if fig is None:
            continue
        cols[drawn % 2].plotly_chart(fig, key=f"compare:{name}")
        drawn += 1
    if metrics and not drawn:
        st.caption(f"None of these jobs logged the chosen metrics on the {split} split yet.")
    st.markdown(f"**Final metrics ({split})**, from each succeeded job's result")
    table = final_table([by_id[i] for i in chosen], split, metrics or available)
    st.dataframe(
        table,
        hide_index=True,
        column_config={n: st.column_config.NumberColumn(n, format="%.4g") for n in (metrics or available)},
    )


connection.run_page(main)
