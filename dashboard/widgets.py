"""Pieces several pages share: the job picker (synced with `?job=` in the URL, so a job's page
can be linked), the live-refresh wrapper, and the page paths for navigation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import connection
from dashboard.api_client import ApiClient, ApiError
from dashboard.formatting import job_label

PAGES = Path(__file__).resolve().parent / "views"
JOB_PAGE, INSPECTOR_PAGE, JOBS_PAGE, NEW_PAGE, COMPARE_PAGE = (
    PAGES / f"{name}.py" for name in ("job", "inspector", "jobs", "new_job", "compare")
)
PICKER_JOBS = 100  # the newest jobs offered in pickers; any other id can be typed in


def recent_jobs(client: ApiClient, *, limit: int = PICKER_JOBS) -> list[dict[str, Any]]:
    return list(client.list_jobs(limit=limit)["data"])


def job_picker(client: ApiClient, *, label: str = "Job") -> dict[str, Any] | None:
    """A select box of the newest jobs (any other id may be typed in) whose choice is kept in the
    URL's `?job=`; returns the chosen job as the API shows it now, or None."""
    jobs = recent_jobs(client)
    by_id = {j["id"]: j for j in jobs}
    wanted = st.query_params.get("job")
    options = list(by_id)
    if wanted and wanted not in by_id:
        options.insert(0, wanted)
    if not options:
        st.info("No jobs yet: create one on the **New job** page.")
        return None
    index = options.index(wanted) if wanted in options else 0
    # No widget key: a changed `?job=` (a link from another page) must reset the choice.
    choice = st.selectbox(
        label,
        options,
        index=index,
        format_func=lambda i: job_label(by_id[i]) if i in by_id else i,
        accept_new_options=True,
        help="The newest jobs of this key; paste any job id to open another.",
    )
    if not choice:
        return None
    choice = str(choice).strip()
    if st.query_params.get("job") != choice:
        st.query_params["job"] = choice
    try:
        return by_id[choice] if choice in by_id else client.get_job(choice)
    except ApiError as exc:
        if exc.status in (404, 422):
            st.warning(f"No job `{choice}` for this key ({exc.message}).")
            return None
        raise


def live(active: bool, body: Callable[[], bool], *, key: str) -> None:
    """Run `body` in a fragment that reruns every few seconds while `active`; `body` returns
    whether anything still runs, and a change of that reruns the page (to start or stop the
    timer, which a fragment fixes when it is defined)."""
    flag = f"live:{key}"
    if flag not in st.session_state:
        st.session_state[flag] = active
    every = connection.refresh_seconds() if st.session_state[flag] else None

    @st.fragment(run_every=every)
    def fragment() -> None:
        still = connection.guarded(body)
        if bool(still) != st.session_state[flag]:
            st.session_state[flag] = bool(still)
            st.rerun()

    fragment()
