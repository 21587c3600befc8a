#!/usr/bin/env bash
# The README's test command: set up what the suite needs, lint, and run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k loss -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh dev

# The browser test drives Debian's Chromium (never a downloaded browser build).
if [ ! -x /usr/bin/chromium ]; then
    echo "[test] installing Debian's chromium for the browser test"
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); else apt=(sudo apt-get); fi
    "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq chromium >/dev/null
fi

# The service tests need PostgreSQL and Redis on loopback (they are started before sessions and CI).
.venv/bin/python - <<'PY'
import socket, sys
missing = []
for name, port, start in (
    ("PostgreSQL", 5432, "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"),
    ("Redis", 6379, "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"),
):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        missing.append(f"  {name} is not listening on 127.0.0.1:{port}; start it with: {start}")
if missing:
    print("[test] the service tests need:\n" + "\n".join(missing), file=sys.stderr)
    sys.exit(1)
PY

# shellcheck disable=SC1091
. .venv/bin/activate
echo "[test] ruff"
ruff check .
ruff format --check . >/dev/null || { echo "ruff format would change files: run 'ruff format .'"; exit 1; }

echo "[test] pytest"
python -m pytest "$@"
