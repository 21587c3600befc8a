"""Smoke run of bench/api_latency.py (it needs Redis and PostgreSQL, hence here): it must run
and print its table. No timing is asserted: the numbers of a smoke run mean nothing."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_api_latency_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/api_latency.py", "--smoke", "--backends", "sqlite,postgresql"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for backend in ("sqlite", "postgresql"):
        for op in ("create", "get"):
            assert any(
                line.startswith(f"| {backend}") and f"| {op}" in line for line in proc.stdout.splitlines()
            )
