"""A bad service setting in the environment is one line naming the variable, not a traceback
(found: `TVKD_WORKER_DEVICES=abc tvkd worker` printed pydantic's traceback naming `worker_devices`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("variable", "value", "argv"),
    [
        ("TVKD_WORKER_DEVICES", "abc", ["worker"]),
        ("TVKD_LIMIT_NUM_PROCESSES", "many", ["serve", "--port", "0"]),
    ],
)
def test_a_bad_setting_names_its_environment_variable(
    variable: str, value: str, argv: list[str], tmp_path: os.PathLike[str]
) -> None:
    env = {**os.environ, variable: value, "TVKD_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "tvkd.cli", *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    line = next(ln for ln in run.stderr.splitlines() if variable in ln)
    assert line.startswith("error: ") and repr(value) in line
