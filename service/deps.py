"""FastAPI dependencies: settings, a database session per request, and the caller's API key."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import KeyCache
from service.disclosure import Redactor
from service.errors import APIError
from service.settings import Settings

T = TypeVar("T")

# Identifiers are `<prefix>_<hex>` (service.models.new_id). Anything else cannot name a row, so it
# is a 404 without a query (and never reaches the database: PostgreSQL rejects NUL in text).
ID_RE = re.compile(r"^[a-z]{1,8}_[0-9a-f]{1,64}$")

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer <key>`. Keys come from `tvkd keys create` or "
    "TVKD_API_KEYS.",
)


# The dependencies below are `async def` on purpose: FastAPI runs every sync dependency in the
# threadpool, one hop each, and these do no blocking work in the common case (creating a session
# opens no connection; a cached key needs no query). Only the route's own database work, and a
# key lookup on a cache miss, go to a thread.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redactor(request: Request) -> Redactor:
    return request.app.state.redactor


READ_METHODS = frozenset({"GET", "HEAD"})


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for this request: autocommit for reads (each SELECT its own snapshot, which the
    keyset pages tolerate), transactional for writes."""
    state = request.app.state
    session = state.read_sessions() if request.method in READ_METHODS else state.sessions()
    try:
        yield session
    finally:
        # Returning the connection to the pool rolls back its (read) transaction: a network round
        # trip on PostgreSQL, so done in a thread; there is nothing to return when no query ran.
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


def _unauthorized(code: str, message: str) -> APIError:
    return APIError(401, code, message, headers={"WWW-Authenticate": 'Bearer realm="tvkd"'})


async def current_owner(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The id of the caller's API key; 401 without a valid `Authorization: Bearer <key>`."""
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing_api_key", "send an API key as 'Authorization: Bearer <key>'")
    keys: KeyCache = request.app.state.keys
    owner = keys.cached(credentials.credentials)
    if owner is None:
        owner = await run_in_threadpool(keys.owner, session, credentials.credentials)
    if owner is None:
        raise _unauthorized("invalid_api_key", "the API key is not valid")
    return owner


def in_one_thread(route: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """Make a blocking route body async: it runs in one threadpool call, which also closes the
    request's session (kwarg `session`). A plain `def` route costs three thread hops in FastAPI
    (the body, the response validation, the session's teardown); this is one, a measurable share
    of a 1 ms GET. FastAPI reads the signature and annotations through `__wrapped__`."""

    @functools.wraps(route)
    async def run(*args: Any, **kwargs: Any) -> T:
        session: Session | None = kwargs.get("session")

        def call() -> T:
            try:
                return route(*args, **kwargs)
            finally:
                if session is not None:
                    session.close()

        return await run_in_threadpool(call)

    return run


def checked_id(value: str, what: str) -> str:
    if not ID_RE.match(value):
        raise APIError(404, "not_found", f"no {what} {value!r}")
    return value


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
RedactorDep = Annotated[Redactor, Depends(get_redactor)]
OwnerDep = Annotated[str, Depends(current_owner)]
