"""The API's one error type. Routes raise `APIError`; service.app turns it (and FastAPI's own
request-validation and HTTP errors) into the one error body of every 4xx/5xx:

    {"error": {"code": "...", "message": "...", "field": "hyperparameters.learning_rate" | null,
               "details": [...]}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class APIError(Exception):
    """An error response. `field` names the request part at fault as a dotted path (list indices
    as `[i]`), or a header name such as `Idempotency-Key`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = list(details)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "field": self.field,
                "details": self.details,
            }
        }


def not_found(what: str, ident: str) -> APIError:
    return APIError(404, "not_found", f"no {what} {ident!r}")


def invalid(field: str, message: str, code: str = "invalid_value", **kw: Any) -> APIError:
    return APIError(422, code, message, field=field, **kw)


RETRY_AFTER_SECONDS = 5


def unavailable(what: str = "the database") -> APIError:
    """503 with Retry-After: a dependency is down for now; the same request may succeed later."""
    return APIError(
        503,
        "service_unavailable",
        f"{what} is unavailable right now; retry in a few seconds",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
