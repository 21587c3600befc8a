"""Cursor (keyset) pagination shared by every list endpoint.

A page is asked for with `after` (the last id of the previous page) and `limit`; the query
fetches `limit + 1` rows so that `has_more` needs no COUNT, and `next_after` is the id to pass
next. Keyset rather than offset paging: rows inserted while a client walks the pages neither
shift nor duplicate anything, and a page costs the same deep in the list as at its start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from sqlalchemy import ColumnElement, and_, or_

T = TypeVar("T")

MAX_LIMIT = 100
DEFAULT_LIMIT = 20

LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size (1..100).")]


@dataclass
class Page(Generic[T]):
    rows: list[T]
    has_more: bool

    @classmethod
    def of(cls, rows: Sequence[T], limit: int) -> Page[T]:
        return cls(list(rows[:limit]), len(rows) > limit)

    def next_after(self, key: Any) -> Any:
        """The cursor of the next page: `key(last row)`, or None on the last page."""
        return key(self.rows[-1]) if self.has_more and self.rows else None


def before(created_col: Any, id_col: Any, created: Any, ident: Any) -> ColumnElement[bool]:
    """Rows after the cursor row in (created_at, id) descending order: newest first, with the id
    breaking ties between rows created in the same microsecond. Written as OR/AND rather than a
    row-value comparison so that both SQLite and PostgreSQL use the (owner, created_at, id) index."""
    return or_(created_col < created, and_(created_col == created, id_col < ident))
