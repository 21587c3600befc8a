"""Cursor (keyset) pagination shared by every list endpoint.

A page is asked for with `after` (the last id of the previous page) and `limit`; the query
fetches `limit + 1` rows so that `has_more` needs no COUNT, and `next_after` is the id to pass
next. Keyset rather than offset paging: rows inserted while a client walks the pages neither
shift nor duplicate anything, and a page costs the same deep in the list as at its start.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session

from service.errors import invalid
from service.hyperparams import INT_MAX

T = TypeVar("T")
R = TypeVar("R")

MAX_LIMIT = 100
DEFAULT_LIMIT = 20

LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size (1..100).")]
# The cursor of a list that is a file's entries (a job's samples, its generations): a position.
PositionAfter = Annotated[int | None, Query(ge=0, le=INT_MAX, description="The last `k` seen.")]


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


def newest_first(
    session: Session,
    query: Select[Any],
    created_col: Any,
    key_col: Any,
    *,
    after: str | None,
    limit: int,
    noun: str,
    cursor_where: ColumnElement[bool] | None = None,
    key_pattern: re.Pattern[str] | None = None,
) -> Page[Any]:
    """One page of `query`'s rows, newest first by (created_col, key_col), after the row whose
    key is `after`. The cursor row is looked up with `cursor_where` too (e.g. the owner's rows
    only); an `after` that matches no such row (or not `key_pattern`) is a 422 naming `noun`."""
    if after is not None:
        cursor = None
        if key_pattern is None or key_pattern.match(after):
            lookup = select(created_col, key_col).where(key_col == after)
            if cursor_where is not None:
                lookup = lookup.where(cursor_where)
            cursor = session.execute(lookup).first()
        if cursor is None:
            raise invalid("after", f"no {noun} {after!r} to page after", code="invalid_cursor")
        query = query.where(before(created_col, key_col, cursor[0], cursor[1]))
    rows = session.scalars(query.order_by(created_col.desc(), key_col.desc()).limit(limit + 1)).all()
    return Page.of(rows, limit)


def oldest_first(
    session: Session, query: Select[Any], id_col: Any, *, after: int | None, limit: int
) -> Page[Any]:
    """One page of `query`'s rows in id order (the order they were written), after id `after`."""
    if after is not None:
        query = query.where(id_col > after)
    return Page.of(session.scalars(query.order_by(id_col).limit(limit + 1)).all(), limit)


def position_page(items: Sequence[T], after: int | None, limit: int, row: Callable[[int, T], R]) -> Page[R]:
    """One page of a file's entries after position `after`: `row(k, item)` for each, where `k` is
    the item's position (the rows carry it as "k", the next page's cursor)."""
    start = 0 if after is None else after + 1
    chunk = items[start : start + limit + 1]
    return Page.of([row(start + i, item) for i, item in enumerate(chunk)], limit)
