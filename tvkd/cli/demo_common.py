"""What the two demos (`tvkd demo`, tvkd/cli/demo_pipeline.py; `tvkd demo --real`,
tvkd/cli/demo_real.py) share: their `[demo]` log line, the Idempotency-Key of a job body, the
job follower that prints a progress line every few seconds, and the optional keep-serving tail.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from service.statemachine import TERMINAL  # stdlib only: the client stays light
from tvkd.cli.client import call


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def idempotency_key(body: dict[str, Any]) -> str:
    """Same request ⇒ same key ⇒ the API returns the job already made (a rerun costs nothing)."""
    return "demo-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def follow_lines(
    client: Any,
    job_ids: Mapping[str, str],
    describe: Callable[[str, dict[str, Any]], str],
    *,
    every: float = 5.0,
    out: TextIO | None = None,
) -> dict[str, dict[str, Any]]:
    """Poll the jobs (name → id) until every one is terminal, printing one line
    `[demo]   12s  <describe(name, job)> | ...` every `every` seconds, when a job ends and at the
    end (to `out`, default stderr); returns the final job objects by name, in `job_ids`' order.

    Raises `tvkd.cli.client.ClientError` when the API cannot be reached or refuses a read."""
    out = out or sys.stderr
    t0, last, done = time.monotonic(), -every, 0
    while True:
        jobs = {name: call(client, "GET", f"/v1/jobs/{job_id}") for name, job_id in job_ids.items()}
        finished = sum(j["status"] in TERMINAL for j in jobs.values())
        now = time.monotonic()
        if now - last >= every or finished != done or finished == len(jobs):
            parts = [describe(name, job) for name, job in jobs.items()]
            print(f"[demo] {now - t0:5.0f}s  " + " | ".join(parts), file=out, flush=True)
            last, done = now, finished
        if finished == len(jobs):
            return jobs
        time.sleep(1.0)


def keep_serving(stack: Any, keep_running: bool) -> None:
    """The demos' end: print the dashboard's URL; with `--keep-running`, wait while every
    process of `stack` (`tvkd.cli.up.start_stack`) is alive (Ctrl-C stops it)."""
    if stack.dashboard_url:
        print(f"dashboard: {stack.dashboard_url}")
    if keep_running:
        log("the service keeps running; Ctrl-C stops it")
        while all(stack.alive().values()):
            time.sleep(1)
