#!/usr/bin/env bash
# The README's test command: set up what the suite needs, lint, and run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k loss -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate

echo "[test] ruff"
ruff check .
ruff format --check tvkd tests bench >/dev/null || { echo "ruff format would change files: run 'ruff format'"; exit 1; }

echo "[test] pytest"
python -m pytest "$@"
