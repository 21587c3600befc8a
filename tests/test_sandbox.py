"""Chat templates run under a time and a memory limit (tvkd.sandbox): a template that loops or
grows memory is a named error at its first row, quickly, and the process goes on."""

from __future__ import annotations

import threading
import time

import pytest

from tvkd.data import DataError
from tvkd.pairs import PreferencePair, RowError
from tvkd.sandbox import TemplateLimit, TemplateStopped, limited, stop_when
from tvkd.tokenize import tokenize_pair, tokenize_pairs

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
GROW = (
    "{% set ns = namespace(parts=[]) %}"
    "{% for i in range(100000) %}{% set ns.parts = ns.parts + ['x' * (100000 + i)] %}{% endfor %}"
)
FINE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _pairs(n: int = 3) -> list[PreferencePair]:
    prompt = ({"role": "user", "content": "hello"},)
    return [
        PreferencePair(prompt="", chosen="yes", rejected="no", row=i, prompt_messages=prompt)
        for i in range(n)
    ]


@pytest.mark.parametrize(("template", "code"), [(LOOP, "template_time"), (GROW, "template_memory")])
def test_a_runaway_template_is_a_named_error(tiny_tokenizer_factory, monkeypatch, template, code):
    monkeypatch.setenv("TVKD_TEMPLATE_SECONDS", "1")
    monkeypatch.setenv("TVKD_TEMPLATE_MEMORY_MB", "64")
    tokenizer = tiny_tokenizer_factory(FINE + template)
    t0 = time.monotonic()
    with pytest.raises(RowError) as info:
        tokenize_pair(tokenizer, _pairs(1)[0], max_length=64)
    assert info.value.issue.code == code and "TVKD_TEMPLATE" in info.value.issue.message
    assert time.monotonic() - t0 < 10
    # A dataset stops at its first row (the template, not the row, is at fault), even when
    # bad rows are to be dropped.
    t0 = time.monotonic()
    with pytest.raises(DataError) as data_info:
        tokenize_pairs(tokenizer, _pairs(50), max_length=64, on_error="drop")
    assert [i.code for i in data_info.value.report.issues] == [code]
    assert time.monotonic() - t0 < 10
    # The same rows with a template that terminates are fine afterwards.
    assert len(tokenize_pairs(tiny_tokenizer_factory(FINE), _pairs(3), max_length=64)[0]) == 3


def test_a_stop_request_interrupts_a_looping_template_before_its_time_limit(
    tiny_tokenizer_factory, monkeypatch
):
    """A worker's cancel must not wait for TVKD_TEMPLATE_SECONDS: within `stop_when`, a rendering
    ends with TemplateStopped soon after the predicate turns True, and no bad-row handler (even
    on_error="drop") swallows it."""
    monkeypatch.setenv("TVKD_TEMPLATE_SECONDS", "120")
    tokenizer = tiny_tokenizer_factory(FINE + LOOP)
    asked = threading.Event()
    threading.Timer(0.5, asked.set).start()
    t0 = time.monotonic()
    with pytest.raises(TemplateStopped), stop_when(asked.is_set):
        tokenize_pairs(tokenizer, _pairs(5), max_length=64, on_error="drop")
    assert 0.5 <= time.monotonic() - t0 < 10
    # Outside the block (or with the predicate False) a rendering is not stopped.
    with stop_when(lambda: False):
        assert len(tokenize_pairs(tiny_tokenizer_factory(FINE), _pairs(2), max_length=64)[0]) == 2
    assert limited(lambda: 7, seconds=1) == 7
    # A predicate that raises is not a stop (and does not kill the watchdog's limits).
    monkeypatch.setenv("TVKD_TEMPLATE_SECONDS", "0.5")
    with pytest.raises(RowError) as info, stop_when(lambda: 1 / 0):
        tokenize_pair(tokenizer, _pairs(1)[0], max_length=64)
    assert info.value.issue.code == "template_time"


def test_limited_is_per_thread_and_restores_the_tracer():
    import sys

    before = sys.gettrace()
    assert limited(lambda: 41 + 1, seconds=1) == 42
    assert sys.gettrace() is before
    # Another thread's long Python work is not limited by this one's guard.
    done = threading.Event()

    def busy() -> None:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        done.set()

    worker = threading.Thread(target=busy)
    worker.start()
    with pytest.raises(TemplateLimit):
        _jinja_loop()
    worker.join()
    assert done.is_set()


def _jinja_loop() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(LOOP)
    limited(template.render, seconds=0.2)
