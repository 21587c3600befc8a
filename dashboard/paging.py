"""Previous/next paging over the API's cursor lists (`after` = the last id of the previous page,
`has_more`, `next_after`). The cursors of the pages seen are kept in the session, so "previous"
needs no backwards cursor from the API."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import streamlit as st


class CursorPager:
    """The cursor stack of one list; a new `scope` (another filter, job or page size) starts at
    the first page again."""

    def __init__(self, name: str, scope: Hashable) -> None:
        self.name = name
        key = f"pager:{name}"
        state = st.session_state.get(key)
        if not isinstance(state, dict) or state.get("scope") != scope:
            state = {"scope": scope, "stack": [None]}
            st.session_state[key] = state
        self._state = state

    @property
    def after(self) -> Any:
        return self._state["stack"][-1]

    @property
    def number(self) -> int:
        return len(self._state["stack"])

    def _next(self, cursor: Any) -> None:
        self._state["stack"].append(cursor)

    def _previous(self) -> None:
        if len(self._state["stack"]) > 1:
            self._state["stack"].pop()

    def _first(self) -> None:
        del self._state["stack"][1:]

    def controls(self, page: dict[str, Any], *, noun: str = "items") -> None:
        """First/previous/next buttons under a page of `noun`."""
        if self.number == 1 and not page.get("has_more"):
            return
        first, prev, label, nxt = st.columns([1, 1, 2, 1])
        first.button(
            "First",
            icon=":material/first_page:",
            key=f"{self.name}:first",
            on_click=self._first,
            disabled=self.number == 1,
        )
        prev.button(
            "Previous",
            icon=":material/chevron_left:",
            key=f"{self.name}:prev",
            on_click=self._previous,
            disabled=self.number == 1,
        )
        label.caption(f"Page {self.number} · {len(page.get('data', []))} {noun}")
        nxt.button(
            "Next",
            icon=":material/chevron_right:",
            key=f"{self.name}:next",
            on_click=self._next,
            args=(page.get("next_after"),),
            disabled=not page.get("has_more"),
        )
