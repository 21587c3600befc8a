"""The dashboard's only way to the service: a small httpx client of the REST API.

Every failure becomes one of two exceptions, so pages never show a stack trace:

- `ApiUnavailable`: the API could not be reached or did not answer in time (connection
  refused, DNS, timeout, a proxy's 502/503/504, a body that is not the API's JSON);
- `ApiError`: the API answered with its error body `{"error": {code, message, field, details}}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx

# A page waits this long for an ordinary call; POST /v1/inspect loads a teacher on its first call
# and runs a forward pass, so it gets longer.
DEFAULT_TIMEOUT = 10.0
INSPECT_TIMEOUT = 120.0
CONNECT_TIMEOUT = 3.0


class ApiUnavailable(Exception):
    """The API is down, unreachable or too slow; `reason` says which, for the banner."""

    def __init__(self, url: str, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.timed_out = url, reason, timed_out


@dataclasses.dataclass
class ApiError(Exception):
    """An error response of the API, as its error body describes it."""

    status: int
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class ApiClient:
    """Synchronous client of the TVKD API for one base URL and key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    # ----------------------------------------------------------------------------------------
    # transport

    def request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        """The decoded JSON body of a successful call; raises ApiError / ApiUnavailable."""
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout))
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            wait = timeout or self.timeout
            raise ApiUnavailable(self.base_url, f"no answer within {wait:g} s", timed_out=True) from exc
        except httpx.HTTPError as exc:
            raise ApiUnavailable(self.base_url, _reason(exc)) from exc
        if response.status_code in (502, 503, 504) and not _is_error_body(response):
            # A proxy or load balancer in front of a stopped API, not the API itself.
            raise ApiUnavailable(self.base_url, f"{response.status_code} {response.reason_phrase}")
        if response.status_code >= 400:
            raise _api_error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise ApiUnavailable(
                self.base_url, f"the answer to {method} {path} is not JSON (is this the TVKD API?)"
            ) from exc

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    # ----------------------------------------------------------------------------------------
    # endpoints

    def openapi(self) -> dict[str, Any]:
        return self.get("/openapi.json")

    def list_jobs(self, *, after: str | None = None, limit: int = 20, status: str | None = None) -> Any:
        return self.get("/v1/jobs", after=after, limit=limit, status=status)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}")

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=body, headers=headers)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> Any:
        return self.get(f"/v1/jobs/{job_id}/events", after=after, limit=limit)

    def all_events(self, job_id: str, *, max_pages: int = 10) -> tuple[list[dict[str, Any]], bool]:
        """Up to `max_pages` pages of 1000 events, oldest first, and whether more were left."""
        out: list[dict[str, Any]] = []
        after = None
        for _ in range(max_pages):
            page = self.events(job_id, after=after, limit=1000)
            out.extend(page["data"])
            if not page["has_more"]:
                return out, False
            after = page["next_after"]
        return out, True

    def metric_series(self, job_id: str, *, split: str | None = None) -> list[dict[str, Any]]:
        return self.get(f"/v1/jobs/{job_id}/metrics/series", split=split)["data"]

    def checkpoints(self, job_id: str, *, after: int | None = None, limit: int = 20) -> Any:
        return self.get(f"/v1/jobs/{job_id}/checkpoints", after=after, limit=limit)

    def model_files(self, job_id: str, *, checkpoint: int | None = None) -> dict[str, Any]:
        params = {} if checkpoint is None else {"checkpoint": checkpoint}
        return self.get(f"/v1/jobs/{job_id}/model", **params)

    def samples(self, job_id: str, *, after: int | None = None, limit: int = 20) -> Any:
        return self.get(f"/v1/jobs/{job_id}/samples", after=after, limit=limit)

    def generations(self, job_id: str, *, after: int | None = None, limit: int = 20) -> Any:
        return self.get(f"/v1/jobs/{job_id}/generations", after=after, limit=limit)

    def sample(self, job_id: str, k: int) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}/samples/{k}")

    def inspect(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/inspect", json=body, timeout=max(self.timeout, INSPECT_TIMEOUT))

    def models(self) -> list[dict[str, Any]]:
        return list(self._walk("/v1/models"))

    def datasets(self, *, limit: int = 100) -> list[dict[str, Any]]:
        return self.get("/v1/datasets", limit=limit)["data"]

    def upload_dataset(self, filename: str, content: bytes) -> dict[str, Any]:
        files = {"file": (filename, content, "application/octet-stream")}
        # The API checks every row before it answers: a large file takes a while.
        return self.request("POST", "/v1/datasets", files=files, timeout=max(self.timeout, 120.0))

    def _walk(self, path: str, *, max_pages: int = 20) -> Iterator[dict[str, Any]]:
        after = None
        for _ in range(max_pages):
            page = self.get(path, after=after, limit=100)
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["next_after"]


def _is_error_body(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(
            status=response.status_code,
            code=str(error.get("code") or "error"),
            message=str(error.get("message") or response.reason_phrase),
            field=error.get("field"),
            details=[d for d in error.get("details") or [] if isinstance(d, dict)],
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(status=response.status_code, code="http_error", message=response.text[:300])


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service" in text or "nodename" in text or "resolve" in text:
            return f"cannot resolve the host ({exc})"
        return f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}"
