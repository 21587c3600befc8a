"""`tvkd submit`, `tvkd status`, `tvkd cancel`: a command-line client of the REST API.

It talks HTTP only (httpx), to TVKD_API_URL with the key in TVKD_API_KEY (or `--api-url` /
`--api-key`), so it works against a remote service exactly as against a local one. Errors from
the API are printed from its error body: code, message and the field at fault.

Exit codes: 0 success (with `--wait`: the job succeeded), 1 the API refused the request or the
job did not succeed, 2 usage, 3 the API cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from service.statemachine import TERMINAL  # stdlib only: the client stays light

BAR_WIDTH = 30
POLL_SECONDS = 2.0


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", default=None, help="API base URL (default: $TVKD_API_URL)")
    parser.add_argument("--api-key", default=None, help="API key (default: $TVKD_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a summary")


def register(subparsers: Any) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="submit a job (distillation, DPO or SFT) to the API",
        description="Submit a job. Hyperparameters as --hp key=value (values parsed as JSON when "
        "they are JSON: --hp epochs=2 --hp lora=true --hp 'lora_target_modules=[\"q_proj\"]'). A model "
        "may be another of your jobs' output, job:<id>: the job waits for it.",
    )
    submit.add_argument(
        "--kind",
        choices=("tvkd", "dpo", "sft"),
        default=None,
        help="tvkd (distillation, the API's default), dpo (no teacher) or sft (supervised fine-tuning)",
    )
    submit.add_argument(
        "--teacher", help="teacher model (kind tvkd): a name under the model roots, or job:<id>"
    )
    submit.add_argument(
        "--student", required=True, help="student model: a name under the model roots, or job:<id>"
    )
    submit.add_argument("--dataset", required=True, help="dataset (path under the data roots, or ds_… id)")
    submit.add_argument("--alpha", type=float, default=None, help="shaping weight α (default: the API's)")
    submit.add_argument("--beta", type=float, default=None, help="DPO temperature β (default: the API's)")
    submit.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter")
    submit.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="a metadata pair"
    )
    submit.add_argument("--idempotency-key", default=None, help="retry-safe submit: same key, same job")
    submit.add_argument(
        "--wait", action="store_true", help="wait until the job ends; exit 0 only if it succeeded"
    )
    submit.add_argument(
        "--id-only", action="store_true", help="print only the job id (JOB=$(tvkd submit ... --id-only))"
    )
    _common(submit)
    submit.set_defaults(func=cmd_submit)

    status = subparsers.add_parser(
        "status", help="list your jobs, or show one", description="List your jobs, or show one job."
    )
    status.add_argument("job_id", nargs="?", help="a job id; without it, list jobs")
    status.add_argument(
        "--watch", action="store_true", help="follow the job with a progress bar until it ends"
    )
    status.add_argument("--limit", type=int, default=20, help="jobs to list (default: 20)")
    status.add_argument("--status", dest="status_filter", default=None, help="list only jobs in this status")
    _common(status)
    status.set_defaults(func=cmd_status)

    cancel = subparsers.add_parser("cancel", help="cancel a job", description="Cancel a job.")
    cancel.add_argument("job_id")
    _common(cancel)
    cancel.set_defaults(func=cmd_cancel)


# --------------------------------------------------------------------------------------------
# HTTP


def _settings(args: argparse.Namespace) -> tuple[str, str]:
    from tvkd.cli.api_settings import api_settings

    url, key = api_settings(args.api_url, args.api_key)
    if not key:
        raise ClientError("no API key: set TVKD_API_KEY or pass --api-key", 2)
    return url, key


def connect(url: str, key: str, *, timeout: float = 60) -> Any:
    """The one HTTP client of the API for the command line (`tvkd job ...`, `tvkd demo`): an
    `httpx.Client` on `url` with the key as a bearer token. Raises ClientError without httpx."""
    try:
        import httpx
    except ImportError as exc:
        raise ClientError("the API client needs the service extra: pip install 'tvkd[service]'", 2) from exc
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def _client(args: argparse.Namespace) -> Any:
    return connect(*_settings(args))


def describe_error(response: Any) -> str:
    """One line from the API's error body: `422 invalid_value: message (field: x)`."""
    try:
        error = response.json()["error"]
        line = f"{response.status_code} {error['code']}: {error['message']}"
        if error.get("field"):
            line += f" (field: {error['field']})"
        extra = [d for d in error.get("details") or [] if d.get("field") != error.get("field")][:5]
        for d in extra:
            line += f"\n  {d.get('field') or ''}: {d.get('message', d)}"
        return line
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}: {response.text[:500]}"


def call(client: Any, method: str, path: str, **kw: Any) -> Any:
    import httpx

    try:
        response = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach the API at {client.base_url}: {exc}", 3) from exc
    if response.status_code >= 400:
        raise ClientError(describe_error(response))
    return response.json()


# --------------------------------------------------------------------------------------------
# Commands


def parse_pairs(items: list[str], what: str, *, json_values: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClientError(f"{what} must be KEY=VALUE; got {item!r}", 2)
        if json_values:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value  # a plain string (e.g. terminal=zero)
        else:
            out[key] = value
    return out


def job_line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    fraction = progress.get("fraction")
    pct = f"{100 * fraction:5.1f}%" if fraction is not None else "     -"
    source = f" <- {job['teacher']}" if job.get("teacher") else ""
    waits = ", ".join(f"{f}={r}" for f, r in (job.get("depends_on") or {}).items())
    kind = job.get("kind") or "tvkd"
    line = f"{job['id']}  {kind:<4} {job['status']:<12} {job['stage']:<10} {pct}  {job['student']}{source}"
    return line + (f"  (uses {waits})" if waits else "")


def progress_bar(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    fraction = progress.get("fraction") or 0.0
    filled = round(fraction * BAR_WIDTH)
    eta = progress.get("eta_seconds")
    eta_text = f" eta {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else ""
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * fraction:5.1f}% "
        f"{job['status']} ({job['stage']} {progress.get('done', 0)}/{progress.get('total', 0)}){eta_text}"
    )


def show_job(job: dict[str, Any]) -> None:
    print(job_line(job))
    for warning in job.get("warnings") or []:
        print(f"  warning: {warning}")
    if job.get("error"):
        print(f"  error: {job['error']['code']}: {job['error']['message']}")
    if job.get("model_path"):
        print(f"  model: {job['model_path']}")


def watch(client: Any, job_id: str, *, bar: bool, quiet: bool = False) -> dict[str, Any]:
    """Poll until the job ends, printing a progress bar (on a terminal) or status changes
    (nothing when `quiet`)."""
    tty = bar and sys.stdout.isatty() and not quiet
    last = None
    while True:
        job = call(client, "GET", f"/v1/jobs/{job_id}")
        if quiet:
            pass
        elif tty:
            print("\r" + progress_bar(job).ljust(100), end="", flush=True)
        elif (job["status"], job["stage"]) != last:
            print(progress_bar(job) if bar else f"{job['id']}: {job['status']} ({job['stage']})", flush=True)
            last = (job["status"], job["stage"])
        if job["status"] in TERMINAL:
            if tty:
                print()
            return job
        time.sleep(POLL_SECONDS)


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def cmd_submit(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        body: dict[str, Any] = {"student": args.student, "dataset": args.dataset}
        if args.kind is not None:
            body["kind"] = args.kind
        if args.teacher is not None:
            body["teacher"] = args.teacher
        if args.alpha is not None:
            body["alpha"] = args.alpha
        if args.beta is not None:
            body["beta"] = args.beta
        body["hyperparameters"] = parse_pairs(args.hp, "--hp", json_values=True)
        body["metadata"] = parse_pairs(args.metadata, "--metadata", json_values=False)
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        with _client(args) as client:
            job = call(client, "POST", "/v1/jobs", json=body, headers=headers)
            if args.id_only:
                print(job["id"])
                if not args.wait:
                    return 0
                job = watch(client, job["id"], bar=False, quiet=True)
                return 0 if job["status"] == "succeeded" else 1
            if args.json and not args.wait:
                print(json.dumps(job, indent=2))
                return 0
            show_job(job)
            if not args.wait:
                return 0
            job = watch(client, job["id"], bar=False)
            if args.json:
                print(json.dumps(job, indent=2))
            else:
                show_job(job)
            return 0 if job["status"] == "succeeded" else 1

    return _run(go, args)


def cmd_status(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        with _client(args) as client:
            if args.job_id is None:
                params: dict[str, Any] = {"limit": max(1, min(args.limit, 100))}
                if args.status_filter:
                    params["status"] = args.status_filter
                page = call(client, "GET", "/v1/jobs", params=params)
                if args.json:
                    print(json.dumps(page, indent=2))
                else:
                    for job in page["data"]:
                        print(job_line(job))
                    if not page["data"]:
                        print("no jobs")
                return 0
            if args.watch:
                job = watch(client, args.job_id, bar=True)
                return 0 if job["status"] == "succeeded" else 1
            job = call(client, "GET", f"/v1/jobs/{args.job_id}")
            if args.json:
                print(json.dumps(job, indent=2))
            else:
                show_job(job)
            return 0

    return _run(go, args)


def cmd_cancel(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        with _client(args) as client:
            job = call(client, "POST", f"/v1/jobs/{args.job_id}/cancel")
            if args.json:
                print(json.dumps(job, indent=2))
            else:
                show_job(job)
            return 0

    return _run(go, args)
