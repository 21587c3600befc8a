#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the project into it.
# Idempotent and quick on a second run: it reinstalls only when pyproject.toml changed.
# Usage: scripts/setup.sh [EXTRA]   (EXTRA: "dev" for the test tools; default none)
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "tvkd needs Python >= 3.11 (found $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi

spec="."
[ -n "$extra" ] && spec=".[$extra]"
stamp=".venv/.tvkd-installed-${extra:-base}"
want="$(sha256sum pyproject.toml | cut -c1-64)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing $spec (torch is pinned to 2.13.0, the CPU build where the machine has it)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, pinned: an unpinned resolver run could pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e "$spec"
    echo "$want" > "$stamp"
fi
