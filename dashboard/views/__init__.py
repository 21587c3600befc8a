"""The dashboard's pages: Streamlit scripts that dashboard/app.py registers with st.navigation (not
called pages/, which Streamlit would also serve on its own, without the entry point)."""
