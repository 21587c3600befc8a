#!/usr/bin/env bash
# The README's first command: set up, then run the main job (`tvkd demo`) on embedded defaults.
# Extra arguments go to `tvkd demo` (e.g. scripts/demo.sh --real for the SmolLM2 real-weights run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh service,dashboard
exec .venv/bin/tvkd demo "$@"
