"""New job: a form with every field of the job request, built from the API's OpenAPI schema
(`JobCreate` and its `Hyperparameters`: defaults, help, ranges), the API's 422 shown beside the
field it names, and a dataset upload (checked row by row by the API before it is accepted)."""

from __future__ import annotations

import uuid
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import connection
from dashboard.api_client import ApiClient, ApiError
from dashboard.schema_form import FieldSpec, collect, field_errors, field_specs, render_field, request_schema
from dashboard.widgets import JOB_PAGE

FORM = "new_job"
# Session-state keys; none may equal a widget key (`new_job:<field path>`).
ERRORS, LOOSE, CREATED, IDEMPOTENCY = (
    f"{FORM}!errors",
    f"{FORM}!loose",
    f"{FORM}!created",
    f"{FORM}!idempotency",
)
UPLOADED, DATASET_CHOICE = "upload!result", "upload!dataset"
MODEL_FIELDS = ("teacher", "student")


def upload_section(client: ApiClient) -> None:
    with st.expander("Upload a dataset", expanded=UPLOADED in st.session_state):
        st.caption(
            "JSONL (optionally gzipped), JSON or Parquet, as `prompt`/`chosen`/`rejected`, chat "
            "`messages`, or HH transcripts. The API checks every row; a file with a bad row is refused "
            "with the row and field."
        )
        file = st.file_uploader("Dataset file", key="upload:file")
        if st.button("Upload", key="upload:go", disabled=file is None) and file is not None:
            try:
                st.session_state[UPLOADED] = {"ok": client.upload_dataset(file.name, file.getvalue())}
                st.session_state[DATASET_CHOICE] = st.session_state[UPLOADED]["ok"]["id"]
            except ApiError as exc:
                if exc.status not in (413, 422):
                    raise
                st.session_state[UPLOADED] = {"error": exc}
        result = st.session_state.get(UPLOADED)
        if result and "ok" in result:
            ds = result["ok"]
            st.success(
                f"Uploaded **{ds['filename']}** as `{ds['id']}`: {ds['pairs']} pairs of {ds['rows']} rows. "
                "Its id is filled in as the job's dataset below."
            )
        elif result:
            exc = result["error"]
            st.error(f"Upload refused ({exc.code}): {exc.message}")
            if exc.details:
                st.dataframe(pd.DataFrame(exc.details), hide_index=True)


def model_field(spec: FieldSpec, errors: dict[str, list[str]]) -> Any:
    """Teacher or student: the API's models (GET /v1/models) to pick from; any other name (a hub
    id, a path inside a model root) can be typed in."""
    models = connection.models()
    labels = {
        m["id"]: f"{m['id']} · {m.get('model_type') or '?'} · {m.get('params') or '?'} params" for m in models
    }
    value = st.selectbox(
        spec.name,
        list(labels),
        index=None,
        format_func=lambda o: labels.get(o, o),
        accept_new_options=True,
        key=f"{FORM}:{spec.path}",
        help=f"{spec.help()}  \nOffered: the models under the API's model roots; type any other name.",
        placeholder="Choose or type a model",
    )
    for message in errors.get(spec.path, []):
        st.error(message, icon=":material/error:")
    return value


def dataset_field(spec: FieldSpec, errors: dict[str, list[str]], datasets: list[dict[str, Any]]) -> Any:
    """The dataset: a path under the API's data roots, or an uploaded dataset's id (the newest
    uploads are listed in the help; an upload above fills its id in)."""
    uploaded = "  \n".join(f"`{d['id']}` {d['filename']} ({d['pairs']} pairs)" for d in datasets[:5])
    wanted = st.session_state.get(DATASET_CHOICE) or ""
    value = st.text_input(
        spec.name,
        value=wanted,
        key=f"{FORM}:{spec.path}" + (f":{wanted}" if wanted else ""),
        help=spec.help() + (f"  \nYour newest uploads:  \n{uploaded}" if uploaded else ""),
        placeholder="e.g. data/train.jsonl or ds_…",
    )
    for message in errors.get(spec.path, []):
        st.error(message, icon=":material/error:")
    return value


def job_form(client: ApiClient, doc: dict[str, Any]) -> None:
    specs = field_specs(doc, request_schema(doc, "JobCreate"))
    errors: dict[str, list[str]] = st.session_state.get(ERRORS, {})
    datasets = client.datasets()
    top = [s for s in specs if "." not in s.path]
    hyper = [s for s in specs if s.path.startswith("hyperparameters.")]
    values: dict[str, Any] = {}
    for message in st.session_state.get(LOOSE, []):
        st.error(message, icon=":material/error:")
    with st.form(FORM):
        cols = st.columns(3)
        for i, spec in enumerate(s for s in top if s.name in (*MODEL_FIELDS, "dataset")):
            with cols[i % 3]:
                if spec.name in MODEL_FIELDS:
                    values[spec.path] = model_field(spec, errors)
                else:
                    values[spec.path] = dataset_field(spec, errors, datasets)
        cols = st.columns(3)
        rest = [s for s in top if s.name not in (*MODEL_FIELDS, "dataset")]
        for i, spec in enumerate(rest):
            with cols[i % 3]:
                values[spec.path] = render_field(FORM, spec, errors)
        hyper_errors = any(p.startswith("hyperparameters.") for p in errors)
        with st.expander(
            f"Hyperparameters ({len(hyper)} settings, defaults from the API)", expanded=hyper_errors
        ):
            cols = st.columns(3)
            for i, spec in enumerate(hyper):
                with cols[i % 3]:
                    values[spec.path] = render_field(FORM, spec, errors)
        submitted = st.form_submit_button("Create job", type="primary")
    if submitted:
        submit(client, specs, values)


def submit(client: ApiClient, specs: list[FieldSpec], values: dict[str, Any]) -> None:
    body, local = collect(specs, values)
    st.session_state[LOOSE] = []
    if local:
        st.session_state[ERRORS] = local
        st.rerun()
    # One key per filled-in form: a double submit (or a retry after a timeout) makes one job.
    key = st.session_state.setdefault(IDEMPOTENCY, f"dashboard-{uuid.uuid4()}")
    try:
        job = client.create_job(body, idempotency_key=key)
    except ApiError as exc:
        if exc.status != 422:
            raise
        placed, loose = field_errors(exc, [s.path for s in specs])
        st.session_state[ERRORS], st.session_state[LOOSE] = placed, loose
        if exc.field == "Idempotency-Key":
            st.session_state.pop(IDEMPOTENCY, None)
        st.rerun()
    st.session_state[ERRORS] = {}
    st.session_state[CREATED] = job
    st.session_state.pop(IDEMPOTENCY, None)
    st.rerun()


def main(client: ApiClient) -> None:
    st.title("New job")
    doc = connection.openapi()
    created = st.session_state.get(CREATED)
    if created:
        st.success(f"Created job `{created['id']}` (status {created['status']}).")
        for warning in created.get("warnings", []):
            st.warning(warning)
        st.page_link(
            JOB_PAGE,
            label=f"Open {created['id']}",
            icon=":material/monitoring:",
            query_params={"job": created["id"]},
        )
    upload_section(client)
    st.caption(
        "Every field of the API's job request, with its defaults and help (the ? beside each field). "
        "Only the fields you change are sent; the API fills in the rest."
    )
    job_form(client, doc)


connection.run_page(main)
