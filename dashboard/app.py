"""The dashboard's entry point: `streamlit run dashboard/app.py` (what `tvkd dashboard` runs).

Sets up the page, asks a visitor to log in (dashboard/login.py) before anything else runs, and
sets up the navigation between the pages (dashboard/views/*.py, each a Streamlit script).
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

from dashboard import connection, login  # noqa: E402
from dashboard.widgets import COMPARE_PAGE, INSPECTOR_PAGE, JOB_PAGE, JOBS_PAGE, NEW_PAGE  # noqa: E402


def sidebar(who: login.Login) -> None:
    with st.sidebar:
        st.markdown("### TVKD")
        login.sidebar(who)


def main() -> None:
    st.set_page_config(page_title="TVKD dashboard", page_icon=":material/science:", layout="wide")
    pages = [
        st.Page(JOBS_PAGE, title="Jobs", icon=":material/list_alt:", default=True),  # served at /
        st.Page(NEW_PAGE, title="New job", icon=":material/add_circle:", url_path="new"),
        st.Page(JOB_PAGE, title="Job", icon=":material/monitoring:", url_path="job"),
        st.Page(
            INSPECTOR_PAGE, title="Token inspector", icon=":material/manage_search:", url_path="inspector"
        ),
        st.Page(COMPARE_PAGE, title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    ]
    # The page is resolved from the URL first, so that a visitor who opens a link (say
    # /inspector?job=…) lands on it once logged in; it runs only after the login gate.
    page = st.navigation(pages, position="sidebar" if login.current() else "hidden")
    who = login.gate(connection.timeout())  # stops here until the visitor has logged in
    sidebar(who)
    page.run()


main()
