"""A size limit on request bodies that are not file uploads (JSON): 413 past it.

Starlette reads a JSON body whole before a route sees it, so without a limit one request of
gigabytes is held in memory. This ASGI middleware refuses a declared Content-Length over the
limit before reading anything, and cuts off a chunked body at the first byte past it.
Multipart uploads have their own, larger limit (`service.uploads`).
"""

from __future__ import annotations

from typing import Any

from service.errors import APIError

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        "body_too_large",
        f"the request body is larger than the limit of {limit} bytes (TVKD_MAX_JSON_BODY_BYTES)",
    )


class BodyLimit:
    """Pure ASGI middleware: at most `limit` bytes of body for every non-multipart request."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _answer(send, too_large(self.limit))
            return
        # Read the (bounded) body first, so a body cut off past the limit is a 413 and not the
        # route's body-parse error; then hand the app what was read.
        messages, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await _answer(send, too_large(self.limit))
                return
            messages.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> dict[str, Any]:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


async def _answer(send: Any, error: APIError) -> None:
    import json

    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
