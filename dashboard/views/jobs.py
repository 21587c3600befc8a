"""Jobs: the key's jobs, newest first, a page at a time, with status, stage, progress and ETA,
α/β, models and times; filtered by status; refreshed every few seconds while any of them runs."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import connection
from dashboard.api_client import ApiClient
from dashboard.formatting import duration, is_active, job_label, when
from dashboard.paging import CursorPager
from dashboard.widgets import INSPECTOR_PAGE, JOB_PAGE, live

PAGE_SIZES = (5, 10, 20, 50, 100)
ALL = "all"


def statuses(doc: dict[str, Any]) -> list[str]:
    """The job statuses, from the API's schema of a job."""
    schemas = doc.get("components", {}).get("schemas", {})
    return list(schemas.get("Job", {}).get("properties", {}).get("status", {}).get("enum", []))


def table(jobs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        p = job.get("progress") or {}
        rows.append(
            {
                "job": f"job?job={job['id']}",
                "tokens": f"inspector?job={job['id']}",
                "status": job["status"],
                "stage": job["stage"],
                "progress": p.get("fraction"),
                "done": f"{p.get('done', 0)}/{p.get('total', 0)}" if p.get("total") else "",
                "ETA": duration(p.get("eta_seconds")) if is_active(job) else "",
                "α": job["alpha"],
                "β": job["beta"],
                "teacher": job["teacher"],
                "student": job["student"],
                "dataset": job["dataset"],
                "created": when(job.get("created_at")),
                "finished": when(job.get("finished_at")),
            }
        )
    return pd.DataFrame(rows)


COLUMNS = {
    "job": st.column_config.LinkColumn("job", display_text=r"job\?job=(.*)", help="Open the job"),
    "tokens": st.column_config.LinkColumn(
        "inspect", display_text="tokens", help="Open the job's token inspector"
    ),
    "progress": st.column_config.ProgressColumn(
        "progress", min_value=0.0, max_value=1.0, format="percent", help="Of the current stage"
    ),
    "α": st.column_config.NumberColumn("α", format="%g"),
    "β": st.column_config.NumberColumn("β", format="%g"),
}


def show_page(client: ApiClient, status: str, size: int, pager: CursorPager) -> bool:
    page = client.list_jobs(after=pager.after, limit=size, status=None if status == ALL else status)
    jobs = page["data"]
    running = sum(is_active(j) for j in jobs)
    if not jobs:
        what = "jobs" if status == ALL else f"jobs with status `{status}`"
        st.info(f"No {what} on this page. Create one on the **New job** page.")
    else:
        st.dataframe(table(jobs), hide_index=True, column_config=COLUMNS, width="stretch")
    pager.controls(page, noun="jobs")
    if running:
        every = connection.refresh_seconds()
        st.caption(f":material/autorenew: {running} job(s) running: refreshing every {every:g} s.")
    else:
        st.caption("No job on this page is running; it is not refreshed automatically.")
    if jobs:
        pick, open_job, open_tokens = st.columns([4, 1, 1], vertical_alignment="bottom")
        by_id = {j["id"]: j for j in jobs}
        chosen = pick.selectbox(
            "Open", list(by_id), format_func=lambda i: job_label(by_id[i]), key="jobs:open"
        )
        if open_job.button("Job page", key="jobs:open-job"):
            st.switch_page(JOB_PAGE, query_params={"job": chosen})
        if open_tokens.button("Token inspector", key="jobs:open-tokens"):
            st.switch_page(INSPECTOR_PAGE, query_params={"job": chosen})
    return running > 0


def main(client: ApiClient) -> None:
    st.title("Jobs")
    left, right, refresh = st.columns([3, 1, 1], vertical_alignment="bottom")
    status = left.selectbox("Status", [ALL, *statuses(connection.openapi())], key="jobs:status")
    size = right.selectbox("Per page", PAGE_SIZES, index=PAGE_SIZES.index(20), key="jobs:size")
    refresh.button("Refresh", icon=":material/refresh:", key="jobs:refresh")
    pager = CursorPager("jobs", (status, size))
    live(False, lambda: show_page(client, status, size, pager), key="jobs")


connection.run_page(main)
