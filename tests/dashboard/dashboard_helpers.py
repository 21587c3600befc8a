"""Helpers of the dashboard tests (imported by name, not through `conftest`, which is a
different module depending on the order pytest loads the test folders in).

The service tests' helpers and fixtures live in tests/service/conftest.py; `service` is that file
loaded under a module name of its own, so it is reused rather than copied.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"


def _load_service_conftest() -> ModuleType:
    name = "tvkd_tests_service_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "service" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


service = _load_service_conftest()
ALICE, BOB = service.ALICE, service.BOB
client, wait_for, free_port = service.client, service.wait_for, service.free_port

# Real jobs on the tiny models: 4 steps, checkpoints every 2, 2 per-token samples (seconds).
JOB_SETTINGS = {"max_steps": 4, "save_every": 2, "batch_size": 4, "learning_rate": 1e-3, "num_samples": 2}


@dataclass
class Jobs:
    tvkd: dict[str, Any]  # α = 0.7, succeeded
    dpo: dict[str, Any]  # α = 0, succeeded
    waiting: dict[str, Any]  # submitted with no worker running: not finished

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [self.tvkd, self.dpo]


def job_body(assets: dict[str, str], alpha: float, **settings: Any) -> dict[str, Any]:
    return {**assets, "alpha": alpha, "beta": 0.1, "hyperparameters": {**JOB_SETTINGS, **settings}}


def open_page(page: str, *, timeout: float = 60, **query: str | list[str]) -> Any:
    """An AppTest of the dashboard showing `page` (a file under dashboard/views) with `query`
    as the URL's query parameters, for a visitor logged in with their own key: the session holds
    the login that the login form makes (dashboard/login.py, tested in test_login.py) for the key
    TVKD_API_KEY at TVKD_API_URL of this test's environment."""
    from streamlit.testing.v1 import AppTest

    from dashboard.login import SESSION_KEY, Login, configured_url

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.session_state[SESSION_KEY] = Login(configured_url(), os.environ.get("TVKD_API_KEY", ""), "key")
    at.run()  # the first run registers the pages (st.navigation) so switch_page can find them
    at.switch_page(f"views/{page}.py")
    at.query_params.clear()
    at.query_params.update(query)
    return at.run()


def texts(at: Any) -> str:
    """Everything the page wrote as text (markdown, captions, alerts, metrics), for assertions."""
    parts: list[str] = []
    for kind in (
        "markdown",
        "caption",
        "info",
        "warning",
        "error",
        "success",
        "title",
        "header",
        "subheader",
    ):
        parts.extend(str(e.value) for e in getattr(at, kind))
    parts.extend(f"{m.label}={m.value}" for m in at.metric)
    return "\n".join(parts)


def after(at: Any, key: str) -> list[Any]:
    """The elements that follow the widget `key` in document order, up to the next widget: what
    the page shows right beside (below) that field."""
    from streamlit.testing.v1.element_tree import Block, Widget

    nodes = [n for n in at.main if not isinstance(n, Block)]
    index = next((i for i, n in enumerate(nodes) if getattr(n, "key", None) == key), None)
    assert index is not None, f"no widget {key!r} on the page"
    out = []
    for node in nodes[index + 1 :]:
        if isinstance(node, Widget):
            break
        out.append(node)
    return out


def no_exceptions(at: Any) -> None:
    assert not at.exception, [e.value for e in at.exception]
