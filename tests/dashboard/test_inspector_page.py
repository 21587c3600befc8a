"""The Token inspector against the real API: a finished job's sample pair side by side, coloured
by each signal, top-3 ψ highlighted, tooltips and sums as the API serves them; free inspection
through POST /v1/inspect (escaped text, long responses a page at a time, 422 beside the field)."""

from __future__ import annotations

import html
import re
from typing import Any

from dashboard_helpers import Jobs, after, client, no_exceptions, open_page, texts

FREE = "inspect"
ATTR = re.compile(r'data-value="([^"]*)"')


def blocks(at: Any) -> dict[str, str]:
    """side → the HTML of its token block."""
    out = {}
    for element in at.get("html"):
        m = re.search(r'class="tvkd-response" data-side="([^"]+)"', element.value)
        if m:
            out[m.group(1)] = element.value
    return out


def legend(at: Any) -> str:
    return next(e.value for e in at.get("html") if "tvkd-legend" in e.value)


def values_in(block: str) -> list[float | None]:
    return [None if v == "n/a" else float(v) for v in ATTR.findall(block)]


def test_sample_pair(jobs: Jobs, dashboard_env: str) -> None:
    job = jobs.tvkd
    with client(dashboard_env) as c:
        detail = c.get(f"/v1/jobs/{job['id']}/samples/1").json()
    at = open_page("inspector", job=job["id"], k="1")
    no_exceptions(at)
    sides = blocks(at)
    assert set(sides) == {"chosen", "rejected"}
    for name in ("chosen", "rejected"):
        tokens = detail[name]["tokens"]
        block = sides[name]
        assert block.count('class="tvkd-tok') == len(tokens)
        # Coloured by ψ (the default signal): the API's values, in order.
        assert values_in(block) == [float(f"{t['psi']:.6g}") for t in tokens]
        assert len(set(re.findall(r"background:(rgb\([^)]*\))", block))) >= 3
        # The three largest ψ are outlined and ranked.
        top = sorted(range(len(tokens)), key=lambda i: -tokens[i]["psi"])[:3]
        marked = [int(i) for i in re.findall(r'class="tvkd-tok tvkd-top" data-index="(\d+)"', block)]
        assert sorted(marked) == sorted(top)
        assert sorted(re.findall(r'class="tvkd-rank"[^>]*>(\d)<', block)) == ["1", "2", "3"]
        # A tooltip per token with its text, id and every signal.
        first = html.unescape(re.search(r'title="([^"]*)"', block).group(1))  # type: ignore[union-attr]
        t0 = tokens[0]
        assert f"text: {t0['text']!r}" in first and f"id: {t0['id']}" in first
        assert (
            "ψ_t:" in first and "V(s_t):" in first and "β·log-ratio:" in first and "teacher log p:" in first
        )
    # The sums beside each response are the API's.
    text = texts(at)
    assert f"Σψ **{detail['chosen']['sum_psi']:.5g}**" in text
    assert f"Σ β·log-ratio **{detail['rejected']['sum_logratio']:.5g}**" in text
    assert "ψ_t = γ·V(s_{t+1}) − V(s_t)" in html.unescape(legend(at))

    # V(s_t), centred at V(s_1) (said in the legend), so the colours are not all one.
    at.radio(key="signal").set_value("value").run()
    no_exceptions(at)
    start = detail["chosen"]["value_start"]
    assert f"V(s_1) = {start:.6g}" in legend(at)
    chosen = values_in(blocks(at)["chosen"])
    assert chosen[0] == 0.0  # token 1's state is s_1
    expected = [float(f"{t['value'] - start:.6g}") for t in detail["chosen"]["tokens"]]
    assert chosen == expected

    at.radio(key="signal").set_value("logratio").run()
    no_exceptions(at)
    assert values_in(blocks(at)["rejected"]) == [
        float(f"{t['logratio']:.6g}") for t in detail["rejected"]["tokens"]
    ]


def inspect(at: Any, prompt: str, response: str, **options: float) -> Any:
    at.selectbox(key=f"{FREE}:teacher").set_value("teacher")
    at.text_area(key=f"{FREE}:prompt").set_value(prompt)
    at.text_area(key=f"{FREE}:response").set_value(response)
    for name, value in options.items():
        at.number_input(key=f"{FREE}:{name}").set_value(value)
    (button,) = [b for b in at.form_submit_button if b.label == "Inspect"]
    return button.click().run()


def test_free_inspection_escapes_text(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("inspector")
    at.radio(key=f"{FREE}:chat").set_value("raw text")
    inspect(at, "Q: <b>bold</b>?", "<script>alert('x')</script> & done")
    no_exceptions(at)
    block = blocks(at)["response"]
    assert "<script" not in block and "<b>" not in block
    assert "&lt;" in block and "&amp;" in block
    shown = "".join(html.unescape(t) for t in re.findall(r'class="tvkd-tok[^"]*"[^>]*>([^<]*)</span>', block))
    # The response's text, then the end-of-text token (itself `</s>`, escaped like the rest).
    assert shown.startswith("<script>alert('x')</script> & done")
    assert block.count("tvkd-top") == 3

    at.radio(key="signal").set_value("logratio").run()
    assert "no student" in texts(at)
    assert set(values_in(blocks(at)["response"])) == {None}


def test_free_inspection_pages_long_responses(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("inspector")
    inspect(at, "Say many things.", "zq" * 350)
    no_exceptions(at)
    n = len(at.session_state[f"{FREE}!result"]["tokens"])
    assert n > 400, "the response should be longer than one page of tokens"
    pages = -(-n // 400)
    (pager,) = at.get("pagination")
    first = blocks(at)["response"]
    assert first.count('class="tvkd-tok') == 400
    ranks = first.count('class="tvkd-rank"')
    for number in range(2, pages + 1):
        pager.set_value(number).run()
        no_exceptions(at)
        block = blocks(at)["response"]
        assert f'data-index="{(number - 1) * 400}"' in block and 'data-index="0"' not in block
        ranks += block.count('class="tvkd-rank"')
        (pager,) = at.get("pagination")
    # The top-3 marks belong to the whole response, wherever they fall.
    assert ranks == 3


def test_free_inspection_422_beside_the_field(jobs: Jobs, dashboard_env: str) -> None:
    at = open_page("inspector")
    inspect(at, "Hello", "", gamma=2.0)
    no_exceptions(at)
    beside_response = " ".join(str(getattr(n, "value", "")) for n in after(at, f"{FREE}:response"))
    beside_gamma = " ".join(str(getattr(n, "value", "")) for n in after(at, f"{FREE}:gamma"))
    assert "at least 1 character" in beside_response
    assert "less than or equal to 1" in beside_gamma
    assert not blocks(at)
