"""The dashboard's entry point: `streamlit run dashboard/app.py` (what `tvkd dashboard` runs).

Sets up the page, the sidebar's connection settings and the navigation between the pages
(dashboard/views/*.py, each a Streamlit script).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ itself on sys.path, not the folder holding the
# package; add that so `import dashboard` finds this checkout even where it is not installed.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from dashboard import connection  # noqa: E402
from dashboard.widgets import COMPARE_PAGE, INSPECTOR_PAGE, JOB_PAGE, JOBS_PAGE, NEW_PAGE  # noqa: E402


def sidebar() -> None:
    with st.sidebar:
        st.markdown("### TVKD")
        with st.expander("Connection", expanded=False):
            st.text_input(
                "API URL",
                value=connection.env_url(),
                key=connection.URL_KEY,
                help="The TVKD REST API (TVKD_API_URL; `tvkd dashboard --api-url`).",
            )
            st.text_input(
                "API key",
                value=connection.env_key(),
                key=connection.API_KEY_KEY,
                type="password",
                help="Sent as `Authorization: Bearer …` (TVKD_API_KEY; `tvkd dashboard --api-key`). "
                "A key sees its own jobs.",
            )


def main() -> None:
    st.set_page_config(page_title="TVKD dashboard", page_icon=":material/science:", layout="wide")
    sidebar()
    pages = [
        st.Page(JOBS_PAGE, title="Jobs", icon=":material/list_alt:", default=True),  # served at /
        st.Page(NEW_PAGE, title="New job", icon=":material/add_circle:", url_path="new"),
        st.Page(JOB_PAGE, title="Job", icon=":material/monitoring:", url_path="job"),
        st.Page(
            INSPECTOR_PAGE, title="Token inspector", icon=":material/manage_search:", url_path="inspector"
        ),
        st.Page(COMPARE_PAGE, title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    ]
    st.navigation(pages).run()


main()
