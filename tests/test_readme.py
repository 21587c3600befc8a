"""The README's configuration reference and job states are generated from the code; they must not rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    result = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_job_states_are_current():
    """The README's stage table and state diagram are the state machine's (service/statemachine.py)."""
    result = subprocess.run(
        [sys.executable, "scripts/job_states.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "scripts/demo.sh" in text and "scripts/test.sh" in text
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_architecture_path_names_files_that_exist():
    """Each stop of the README's path of one job ("## Architecture") is a file of the repository,
    so the diagram cannot keep a module name after the module moved."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    stops = [line.split()[1] for line in section.splitlines() if line.startswith(("     │ ", "     ▼ "))]
    assert len(stops) >= 8, stops
    missing = [stop for stop in stops if not (ROOT / stop).is_file()]
    assert not missing, f"the README's architecture path names files that do not exist: {missing}"
