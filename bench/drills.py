"""Fault drills: real API and worker processes on PostgreSQL and Redis, attacked while they run
jobs, and a table of what came out.

    python bench/drills.py              # the full drill (~10 min on 2 cores)
    python bench/drills.py --quick      # fewer faults of each kind (~4 min)
    python bench/drills.py --seed 7     # another draw of the random points

Setup (bench/_drill_stack.py): a scratch PostgreSQL schema reached through a TCP proxy, a Redis
database of its own, tiny teacher and student models, one API and two workers (`tvkd worker`,
concurrency 1, every queue). Every job has the same spec (30 steps, a checkpoint every 5), so
every model should be bit-identical to the one of an uninterrupted run, made first.

Drills, one row each:

- **worker kills**: SIGKILL of a random worker at random points (1-5 s apart) while jobs run,
  a new worker started after each kill;
- **connection terminations**: pg_terminate_backend on every connection of the workers, again
  and again for 0.5-3 s, at random points during training;
- **database closed 3 s / 15 s**: the TCP proxy stops (connections cut, new ones refused) during
  training, for all processes, while the client polls the API;
- **Redis flushed**: FLUSHDB (the drill's own database) right after jobs were queued;
- **API killed**: SIGKILL of the API during a burst of creates, each with an Idempotency-Key,
  retried by its client (same key) until the restarted API answers.

Columns: jobs (submitted), lost (not `succeeded` within the drill's time), run twice (a stage
finished by two workers, from the workers' task results; or two jobs for one Idempotency-Key),
model differs (sha256 of the final model's tensors differs from the uninterrupted run's),
5xx (answers 500-599 other than a 503 with Retry-After, the documented answer while the database
is away, which is counted apart).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from _common import markdown_table  # noqa: E402
from _drill_stack import JOB, Stack, stack  # noqa: E402

WAIT = 600.0  # seconds a drill's jobs may take to finish after its faults


class Drill:
    def __init__(self, name: str, faults: int) -> None:
        self.name, self.faults = name, faults
        self.ids: list[str] = []
        self.twice_by_key = 0
        self.lost_keys = 0
        self.note = ""


def drill_kills(s: Stack, rng: random.Random, kills: int) -> Drill:
    drill = Drill("worker kills (SIGKILL at random points)", kills)
    drill.ids = s.submit(max(2, kills // 2))
    done = 0
    while done < kills:
        time.sleep(rng.uniform(1.0, 5.0))
        alive = s.alive_workers()
        if alive:
            s.kill(rng.choice(alive))
            done += 1
            s.start_worker()
        if all((j or {}).get("finished_at") for j in map(s.job, drill.ids)):
            drill.ids += s.submit(2)  # keep work in flight until every kill is done
    return drill


def drill_terminations(s: Stack, rng: random.Random, times: int) -> Drill:
    drill = Drill("connection terminations during training", times)
    drill.ids = s.submit(max(2, times // 2))
    killed = 0
    for _ in range(times):
        if all((j or {}).get("finished_at") for j in map(s.job, drill.ids)):
            drill.ids += s.submit(2)  # every burst lands while a job trains
        deadline = time.monotonic() + 120
        while not s.training(drill.ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.5))
        killed += s.terminate_connections(rng.uniform(0.5, 3.0))
        time.sleep(rng.uniform(1.0, 3.0))
    drill.note = f"{killed} connections terminated"
    return drill


def drill_db_closed(s: Stack, seconds: float) -> Drill:
    drill = Drill(f"database closed {seconds:g} s during training", 1)
    drill.ids = s.submit(2)
    deadline = time.monotonic() + 120
    while not s.training(drill.ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    s.proxy.stop()
    until = time.monotonic() + seconds
    while time.monotonic() < until:  # a client keeps asking meanwhile
        s.job(drill.ids[0])
        time.sleep(0.2)
    s.proxy.start()
    return drill


def drill_redis_flush(s: Stack) -> Drill:
    import redis

    drill = Drill("Redis flushed with jobs queued", 1)
    drill.ids = s.submit(4)  # two run, two wait in the queues
    time.sleep(1.0)
    redis.Redis(host="127.0.0.1", port=6379, db=s.redis_db).flushdb()  # the drill's own database only
    return drill


def drill_api_kill(s: Stack, rng: random.Random, creates: int) -> Drill:
    drill = Drill("API killed during a burst of creates (Idempotency-Key)", 1)
    keys = [f"drill-{rng.getrandbits(64):016x}" for _ in range(creates)]
    created: dict[str, set[str]] = {k: set() for k in keys}
    lock = threading.Lock()

    def client(mine: list[str]) -> None:
        for key in mine:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                r = s.call("POST", "/v1/jobs", json=JOB, headers={"Idempotency-Key": key})
                if r is not None and r.status_code in (200, 201):
                    with lock:
                        created[key].add(r.json()["id"])
                    break
                time.sleep(0.2)  # refused (the API is down) or 5xx: retry with the same key

    threads = [threading.Thread(target=client, args=(keys[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    kill_after = rng.randint(1, max(1, creates // 2))  # a point inside the burst, not after it
    until = time.monotonic() + 120
    while sum(map(bool, created.values())) < kill_after and time.monotonic() < until:
        time.sleep(0.005)
    s.kill_api()
    time.sleep(1.0)
    s.start_api()
    for t in threads:
        t.join()
    # Ask the database too: one job per key, whatever the client saw.
    import sqlalchemy as sa

    engine = sa.create_engine(s.env["TVKD_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT idempotency_key, id FROM jobs WHERE idempotency_key IS NOT NULL")
        ).all()
    engine.dispose()
    per_key: dict[str, set[str]] = {k: set() for k in keys}
    for key, job_id in rows:
        if key in per_key:
            per_key[key].add(job_id)
    drill.ids = sorted({j for ids in per_key.values() for j in ids})
    drill.twice_by_key = sum(len(ids) > 1 for ids in per_key.values())
    drill.lost_keys = sum(not ids for ids in per_key.values())
    drill.note = f"{creates} creates"
    return drill


def tally(s: Stack, drill: Drill, reference: str, before: dict[str, int]) -> list[object]:
    jobs = s.wait(drill.ids, WAIT)
    lost = sum((j or {}).get("status") != "succeeded" for j in jobs.values()) + drill.lost_keys
    time.sleep(2.0)  # a task's result line is logged just after the job row says succeeded
    completions = s.completions()
    finished = {job for job, stage in completions if stage == "evaluate"}
    unseen = sum((j or {}).get("status") == "succeeded" and i not in finished for i, j in jobs.items())
    if unseen:  # the count below would miss their duplicates: say so
        drill.note += f" ({unseen} jobs' last task not in the worker logs)"
    twice = sum(any(n > 1 for (job, _), n in completions.items() if job == i) for i in drill.ids)
    twice += drill.twice_by_key
    differs = sum(s.model_digest(j) not in (None, reference) for j in jobs.values() if j)
    answers = {k: s.answers.status[k] - before.get(k, 0) for k in ("5xx", "503+Retry-After", "no answer")}
    return [drill.name, drill.faults, len(drill.ids) + drill.lost_keys, lost, twice, differs,
            answers["5xx"], answers["503+Retry-After"], answers["no answer"], drill.note]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer faults of each kind (~4 min)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random points")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kills, terminations, creates = (3, 2, 6) if args.quick else (10, 5, 12)
    closed = (3.0,) if args.quick else (3.0, 15.0)
    rows: list[list[object]] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tvkd-drills-") as tmp, stack(Path(tmp)) as s:
        for _ in range(2):
            s.start_worker()
        ref_job = s.wait(s.submit(1), WAIT)
        reference = s.model_digest(next(iter(ref_job.values())) or {})
        if reference is None:
            raise SystemExit(f"the uninterrupted run did not succeed: {ref_job}")
        print(f"uninterrupted run: model sha256 {reference[:16]}…", flush=True)
        steps = [
            lambda: drill_kills(s, rng, kills),
            lambda: drill_terminations(s, rng, terminations),
            *[lambda sec=sec: drill_db_closed(s, sec) for sec in closed],
            lambda: drill_redis_flush(s),
            lambda: drill_api_kill(s, rng, creates),
        ]
        for step in steps:
            before = dict(s.answers.status)
            drill = step()
            rows.append(tally(s, drill, reference, before))
            print(f"{rows[-1][0]}: done ({time.monotonic() - t0:.0f} s)", flush=True)
    headers = ["drill", "faults", "jobs", "lost", "run twice", "model differs", "5xx",
               "503+Retry-After", "refused", "note"]  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    print(f"\nseed {args.seed}, {'quick' if args.quick else 'full'}; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
