"""Token inspector: for each sample pair of a job, the chosen and rejected responses side by
side, every token coloured by ψ_t, V(s_t) or the student's β·log-ratio (as the API computed them),
the three largest-ψ tokens outlined, a tooltip per token, and the per-response sums. Free
inspection runs any prompt/response through a teacher with POST /v1/inspect."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import connection
from dashboard.api_client import ApiClient, ApiError
from dashboard.formatting import number
from dashboard.paging import CursorPager
from dashboard.schema_form import collect, field_errors, field_specs, render_field, request_schema
from dashboard.tokens import (
    SIGNALS,
    TOKENS_PER_PAGE,
    legend_html,
    scale_of,
    signal_values,
    tokens_html,
    top_psi,
)
from dashboard.widgets import job_picker

SAMPLES_PER_PAGE = 20
FREE = "inspect"
# Session-state keys; none may equal a widget key (`inspect:<field>`).
FREE_RESULT, FREE_ERRORS, FREE_LOOSE = f"{FREE}!result", f"{FREE}!errors", f"{FREE}!loose"
# Fields of the inspect request the form draws itself; the rest come from the schema.
CUSTOM_FIELDS = ("teacher", "prompt", "response")


def prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def side_view(
    title: str, side: dict[str, Any], values: list[float | None], scale: float, *, key: str
) -> None:
    """One response: its sums (as the API computed them) and its coloured tokens, a page at a time
    when it is long."""
    tokens = side.get("tokens") or []
    st.markdown(f"#### {title}")
    # The sums are the API's (over the whole response), not added up here from a page of tokens.
    sum_psi, sum_logratio = number(side.get("sum_psi"), 5), number(side.get("sum_logratio"), 5)
    st.markdown(
        f"Σψ **{sum_psi}** · Σ β·log-ratio **{sum_logratio}** · "
        f"V(s_T+1) {number(side.get('value_end'), 6)} · {len(tokens)} tokens",
        help="Σψ: Σ_t ψ_t (α not applied). Σ β·log-ratio: Σ_t β·(log π_θ − log π_ref), the student's DPO "
        "reward of this response. V(s_T+1): the teacher's value after the response.",
    )
    start, stop = 0, len(tokens)
    if len(tokens) > TOKENS_PER_PAGE:
        pages = math.ceil(len(tokens) / TOKENS_PER_PAGE)
        page = st.pagination(pages, key=f"{key}:page")
        start = (page - 1) * TOKENS_PER_PAGE
        stop = min(start + TOKENS_PER_PAGE, len(tokens))
        st.caption(f"Tokens {start}–{stop - 1} of {len(tokens)}.")
    # Ranks over the whole response, so the highlight is the same whichever page is shown.
    st.html(tokens_html(tokens, values, scale, top_psi(tokens), side=title.lower(), start=start, stop=stop))


def pair_view(detail: dict[str, Any], signal: str, *, key: str) -> None:
    chosen, rejected = detail["chosen"], detail["rejected"]
    centre = chosen.get("value_start")  # s_1 is the prompt: the same state for both responses
    values = {
        name: signal_values(side.get("tokens") or [], signal, side.get("value_start", centre))
        for name, side in (("chosen", chosen), ("rejected", rejected))
    }
    scale = scale_of(values["chosen"], values["rejected"])
    st.code(prompt_text(chosen.get("prompt", "")), language=None, wrap_lines=True)
    st.html(legend_html(signal, scale, centre))
    left, right = st.columns(2)
    with left:
        side_view("Chosen", chosen, values["chosen"], scale, key=f"{key}:chosen")
    with right:
        side_view("Rejected", rejected, values["rejected"], scale, key=f"{key}:rejected")


def job_samples(client: ApiClient, signal: str) -> None:
    pick_job, pick_sample = st.columns(2)
    with pick_job:
        job = job_picker(client)
    if job is None:
        return
    pager = CursorPager(f"samples:{job['id']}", SAMPLES_PER_PAGE)
    try:
        page = client.samples(job["id"], after=pager.after, limit=SAMPLES_PER_PAGE)
    except ApiError as exc:
        if exc.status != 404:
            raise
        st.info(f"No samples for this job yet: {exc.message}.")
        return
    samples = page["data"]
    if not samples:
        st.info("This job wrote no samples (`num_samples` = 0).")
        return
    by_k = {s["k"]: s for s in samples}
    wanted = str(st.query_params.get("k", ""))
    index = list(by_k).index(int(wanted)) if wanted.isdigit() and int(wanted) in by_k else 0
    # No widget key: `?k=` (a link to one sample) picks the sample, and the choice goes back there.
    k = pick_sample.selectbox(
        "Sample",
        list(by_k),
        index=index,
        format_func=lambda i: f"#{i} · {prompt_text(by_k[i]['prompt'])[:70]}",
        help=f"Held-out pairs written at step {page.get('step')}, under the trained student.",
    )
    if st.query_params.get("k") != str(k):
        st.query_params["k"] = str(k)
    with st.expander(f"Samples of this job (page {pager.number}: {len(samples)})"):
        overview = pd.DataFrame(
            [
                {
                    "k": s["k"],
                    "prompt": prompt_text(s["prompt"])[:80],
                    "chosen": s["chosen"]["text"][:60],
                    "rejected": s["rejected"]["text"][:60],
                    "Σψ chosen": s["chosen"]["sum_psi"],
                    "Σψ rejected": s["rejected"]["sum_psi"],
                    "Σ β·log-ratio chosen": s["chosen"]["sum_logratio"],
                    "Σ β·log-ratio rejected": s["rejected"]["sum_logratio"],
                }
                for s in samples
            ]
        )
        st.dataframe(overview, hide_index=True, key=f"samples:{job['id']}:overview")
        pager.controls(page, noun="samples")
    # Only the chosen sample's tokens are fetched: the list carries summaries only.
    detail = client.sample(job["id"], int(k))
    pair_view(detail, signal, key=f"{job['id']}:{k}")


def free_form(client: ApiClient) -> None:
    doc = connection.openapi()
    specs = field_specs(doc, request_schema(doc, "InspectRequest"))
    by_name = {s.path: s for s in specs}
    errors: dict[str, list[str]] = st.session_state.get(FREE_ERRORS, {})
    models = connection.models()
    for message in st.session_state.get(FREE_LOOSE, []):
        st.error(message, icon=":material/error:")
    with st.form(FREE):
        top = st.columns([2, 1])
        teacher = top[0].selectbox(
            "teacher",
            [m["id"] for m in models],
            accept_new_options=True,
            key=f"{FREE}:teacher",
            help=by_name["teacher"].help()
            + "  \nOffered: models under the API's model roots (GET /v1/models).",
        )
        for message in errors.get("teacher", []):
            top[0].error(message, icon=":material/error:")
        chat = top[1].radio(
            "prompt format",
            ["chat (one user message)", "raw text"],
            key=f"{FREE}:chat",
            help="Chat: rendered with the teacher's chat template. Raw: the text as it is.",
        )
        prompt = st.text_area("prompt", key=f"{FREE}:prompt", help=by_name["prompt"].help())
        for message in errors.get("prompt", []):
            st.error(message, icon=":material/error:")
        response = st.text_area("response", key=f"{FREE}:response", help=by_name["response"].help())
        for message in errors.get("response", []):
            st.error(message, icon=":material/error:")
        options = [s for s in specs if s.path not in CUSTOM_FIELDS]
        values: dict[str, Any] = {}
        with st.expander(
            "Method options (defaults from the API)", expanded=any(p in errors for p in by_name)
        ):
            cols = st.columns(4)
            for i, spec in enumerate(options):
                with cols[i % 4]:
                    values[spec.path] = render_field(FREE, spec, errors)
        submitted = st.form_submit_button("Inspect", type="primary")
    if not submitted:
        return
    body, local = collect(options, values)
    body["teacher"] = teacher or ""
    body["prompt"] = [{"role": "user", "content": prompt}] if chat.startswith("chat") else prompt
    body["response"] = response
    st.session_state[FREE_LOOSE] = []
    st.session_state[FREE_ERRORS] = local
    if local:
        st.rerun()
    try:
        with st.spinner("The teacher reads the response…"):
            st.session_state[FREE_RESULT] = client.inspect(body)
        st.session_state[FREE_ERRORS] = {}
    except ApiError as exc:
        if exc.status != 422:
            raise
        placed, loose = field_errors(exc, list(by_name))
        st.session_state[FREE_ERRORS], st.session_state[FREE_LOOSE] = placed, loose
        st.session_state.pop(FREE_RESULT, None)
    st.rerun()


def free_result(signal: str) -> None:
    result = st.session_state.get(FREE_RESULT)
    if not result:
        return
    values = signal_values(result.get("tokens") or [], signal, result.get("value_start"))
    scale = scale_of(values)
    st.html(legend_html(signal, scale, result.get("value_start")))
    if signal == "logratio":
        st.caption("A free inspection has no student, so there is no log-ratio: tokens are grey.")
    side_view("Response", result, values, scale, key="free")
    with st.expander("Method the API used"):
        st.json(result.get("method", {}))


def main(client: ApiClient) -> None:
    st.title("Token inspector")
    signal = st.radio(
        "Colour tokens by",
        list(SIGNALS),
        format_func=lambda s: SIGNALS[s].label,
        horizontal=True,
        key="signal",
        help="A diverging scale centred at zero, shared by chosen and rejected. Hover a token for "
        "its text, id and every signal.",
    )
    samples_tab, free_tab = st.tabs(["Job samples", "Free inspection"])
    with samples_tab:
        job_samples(client, signal)
    with free_tab:
        st.caption(
            "Per-token teacher values and shaping for any prompt and response (POST /v1/inspect). The "
            "first call for a teacher loads it and may take a while."
        )
        free_form(client)
        free_result(signal)


connection.run_page(main)
