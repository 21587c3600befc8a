"""The Redis database claim of a test run: renewed while held, freed soon after its holder dies.

A CI run once failed with 'all Redis databases 1..15 are claimed' because runs killed earlier
had left 3-hour claims behind; the claim is now a short lease renewed by its holder.
"""

from __future__ import annotations

import subprocess
import sys
import time

import redis

from service.scratch import CLAIM_KEY, redis_database

HOST, PORT = "127.0.0.1", 6379


def test_a_held_claim_outlives_its_lease_and_is_released_on_exit() -> None:
    admin = redis.Redis(host=HOST, port=PORT, db=0)
    with redis_database(HOST, PORT, lease_seconds=2) as number:
        key = CLAIM_KEY.format(number)
        time.sleep(3.5)  # longer than the lease: only the renewal keeps it
        assert admin.get(key) is not None
        assert 0 < admin.ttl(key) <= 2
    assert admin.get(key) is None


def test_a_killed_holder_frees_its_number_within_the_lease() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from service.scratch import redis_database\n"
            f"with redis_database({HOST!r}, {PORT}, lease_seconds=2) as n:\n"
            "    print(n, flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        number = int(child.stdout.readline())
        key = CLAIM_KEY.format(number)
        admin = redis.Redis(host=HOST, port=PORT, db=0)
        assert admin.get(key) is not None
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while admin.get(key) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admin.get(key) is None, "a SIGKILLed run's claim must lapse within its lease"
