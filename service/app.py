"""The FastAPI application: `create_app(settings)` wires the routers, the per-process state
(engine, sessions, key cache, model-check cache) and the exception handlers that give every error
one shape:

    {"error": {"code", "message", "field", "details"}}

`field` is the dotted path of the offending request part (`hyperparameters.learning_rate`,
`prompt[0].role`), a header name (`Idempotency-Key`), or null. FastAPI's own request validation
errors are rewritten into that shape too (with every problem in `details`), and so is the OpenAPI
document, so clients see one error schema everywhere.

`tvkd serve` runs it with uvicorn as the factory `service.app:create_app` (settings from the
environment).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth import KeyCache, bootstrap_entries, bootstrap_keys, server_secret
from service.bodylimit import BodyLimit
from service.db import is_transient, make_engine, session_factory
from service.disclosure import Redactor
from service.errors import APIError, unavailable
from service.routers import (
    datasets,
    downloads,
    generations,
    health,
    inspect,
    job_records,
    jobs,
    models,
    precomputes,
    samples,
    webhooks,
)
from service.schemas import error_responses
from service.settings import Settings
from service.uploads import prune_incoming
from service.validation import ModelChecks

logger = logging.getLogger(__name__)

LOCATIONS = ("body", "query", "path", "header", "cookie")
# pydantic puts the member of a union that failed into `loc` ("str", "list[Message]", …): not a
# field of the request, so left out of the field path.
UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
BODY_PARSE_ERROR = "There was an error parsing the body"
HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def field_path(loc: Sequence[int | str]) -> str | None:
    """pydantic's error location → `a.b[2].c`, or the header's name for a header."""
    parts = list(loc)
    if parts[:1] == ["header"] and len(parts) > 1:
        return str(parts[1])
    if parts and parts[0] in LOCATIONS:
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in UNION_TAGS or any(c in part for c in "[]-"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def _error_code(kind: str) -> str:
    if kind == "extra_forbidden":
        return "unknown_field"
    if kind == "missing":
        return "missing_field"
    if kind == "json_invalid":
        return "invalid_json"
    if kind.endswith(("_type", "_parsing")) or kind == "string_unicode":
        return "invalid_type"
    return "invalid_value"


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    details = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc is ("body", <character offset>): no field
            reason = (err.get("ctx") or {}).get("error", "")
            details.append(
                {
                    "field": None,
                    "message": f"invalid JSON body: {reason}".rstrip(": "),
                    "type": "json_invalid",
                }
            )
            continue
        field = field_path(err.get("loc", ()))
        details.append({"field": field, "message": err.get("msg", ""), "type": err.get("type", "")})
    first = details[0] if details else {"field": None, "message": "invalid request", "type": ""}
    # A union (e.g. prompt: text or messages) reports one error per member; the deepest path under
    # the same field is the one that says what to fix ("prompt[0].content", not "prompt").
    root = (first["field"] or "").split(".")[0].split("[")[0]
    same = [d for d in details if d["field"] and (d["field"] or "").startswith(root)] if root else []
    if same:
        first = max(same, key=lambda d: len(d["field"] or ""))
    message = f"{first['field']}: {first['message']}" if first["field"] else str(first["message"])
    return {
        "error": {
            "code": _error_code(str(first["type"])),
            "message": message,
            "field": first["field"],
            "details": details,
        }
    }


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        # Messages are made from exceptions and file names: no absolute server path, traceback or
        # SQL leaves (service.disclosure).
        body = request.app.state.redactor.value(exc.body())
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(exc), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # FastAPI's 400 for a body it cannot even decode (not UTF-8): the same 422 as bad JSON.
            body = APIError(422, "invalid_json", "the body is not valid JSON (or not UTF-8)").body()
            return JSONResponse(body, status_code=422)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        body = APIError(exc.status_code, code, str(exc.detail)).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def database_error(request: Request, exc: sa_exc.SQLAlchemyError) -> JSONResponse:
        # The database unreachable, restarting or busy: 503 with Retry-After, not a 500; the
        # log has the driver's message (it names hosts and SQL, so the answer does not).
        if is_transient(exc):
            reason = str(exc).splitlines()[0]
            logger.warning("database unavailable in %s %s: %s", request.method, request.url.path, reason)
            error = unavailable()
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        return await internal_error(request, exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        body = APIError(500, "internal_error", "internal server error; the API log has the details").body()
        return JSONResponse(body, status_code=500)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated document, with FastAPI's default 422 schema replaced by the error body."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("$ref") == "#/components/schemas/HTTPValidationError":
                node["$ref"] = "#/components/schemas/ErrorBody"
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    fix(doc.get("paths", {}))
    schemas = doc.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    app.openapi_schema = doc
    return doc


def _warm_broker(settings: Settings) -> None:
    try:
        from service.queue import warm_up  # Celery and kombu: off the start-up path

        warm_up(settings)
    except Exception as exc:  # best effort: enqueue connects (or reports) on its own
        logger.warning("broker warm-up failed: %s", exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Refuse to start with an unusable key setting (a placeholder secret, a short bootstrap key).
    bootstrap_entries(settings.api_keys)
    secret = server_secret(settings)
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bootstrap_keys(app.state.sessions, settings.api_keys, secret)
        prune_incoming(settings.artifacts)
        # Open the broker connection now so the first job create does not pay for it; in the
        # background, so that a broker that is down does not delay start-up (readyz reports it).
        threading.Thread(target=_warm_broker, args=(settings,), name="broker-warm-up", daemon=True).start()
        yield
        engine.dispose()

    app = FastAPI(
        title="TVKD",
        version="0.1.0",
        description="Distil a DPO teacher's preference alignment into a small student (TVKD). "
        "Every /v1 endpoint needs `Authorization: Bearer <key>`; errors are "
        '`{"error": {"code", "message", "field", "details"}}`.',
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    # Reads run in autocommit: no BEGIN and ROLLBACK around a GET's one or two SELECTs, which on
    # PostgreSQL saved ~0.3 ms of CPU and ~0.8 ms of wall time per request (two round trips).
    app.state.read_sessions = session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))
    # SQLite has one writer at a time and makes the others wait in a sleeping busy handler (1, 2,
    # 5 … 100 ms naps), which under concurrent creates gave seconds of tail latency. Writers of
    # this process queue on a lock instead; PostgreSQL needs none (row locks).
    app.state.write_lock = threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    app.state.keys = KeyCache(secret)
    app.state.redactor = Redactor.from_settings(settings)
    app.state.model_checks = ModelChecks(trust_remote_code=settings.trust_remote_code)
    app.state.head_revision = health.head_revision()
    app.include_router(health.router)
    routers = (
        jobs,
        job_records,
        samples,
        downloads,
        webhooks,
        generations,
        datasets,
        models,
        precomputes,
        inspect,
    )
    for module in routers:
        app.include_router(module.router, responses=error_responses(503))
    _install_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_json_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
