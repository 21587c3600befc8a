"""The TVKD dashboard: a Streamlit app (`tvkd dashboard`) that shows jobs, their curves and the
per-token shaping signals, talking to the REST API over HTTP only (TVKD_API_URL, TVKD_API_KEY)."""
