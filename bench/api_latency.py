"""API latency on loopback: job create and job get under 50 concurrent clients.

Starts a real API process (`tvkd serve`) on a fresh database (SQLite, and PostgreSQL with
`--backends sqlite,postgresql`) with Redis as the broker and no worker (jobs stay queued), tiny
model folders and a dataset under temporary roots. After a warm-up (the first create loads the
model configs and tokenizers once; later creates hit the per-folder cache), `--clients` async
clients each run `--rounds` rounds of: POST /v1/jobs, then GET /v1/jobs/{id} `--gets` times,
back to back (`--think-ms 0`: a closed loop, the hardest case: every client always has a request
in flight, so latency is mostly queueing and throughput is the figure to read) or pausing for a
random 0.5-1.5x the think time between requests, from a random start (paced clients, as people
and dashboards polling a service are). Each request's latency is taken from sending it to
having read the whole response.

    python bench/api_latency.py                        # SQLite; closed loop, then 200 and 500 ms think
    python bench/api_latency.py --backends sqlite,postgresql
    python bench/api_latency.py --think-ms 0,100,500   # one load run per think time
    python bench/api_latency.py --smoke                # seconds; checks the script only

Targets (this 2-core machine, worker idle): create p99 < 50 ms, get p99 < 20 ms. The load
generator runs on the same two cores as the server; it is a lean keep-alive HTTP/1.1 client on
asyncio streams (`--client raw`, the default) so that it takes as little of them as possible;
`--client httpx` uses httpx.AsyncClient instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python bench/api_latency.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from _common import markdown_table  # noqa: E402

PG_URL = os.environ.get("TVKD_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS = ("127.0.0.1", 6379)
KEY = "sk-bench-" + "c" * 24
TARGETS_MS = {"create": 50.0, "get": 20.0}


# --------------------------------------------------------------------------------------------
# Setup: models, data, broker, database, the API process


def make_assets(home: Path) -> dict[str, str]:
    from tvkd.model_prep import build_tiny_model
    from tvkd.tasks import generate, split, write_jsonl

    for sub in ("models", "data", "artifacts"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    build_tiny_model(home / "models" / "teacher", seed=1)
    build_tiny_model(home / "models" / "student", seed=2)
    train, held_out = split(generate(48, seed=0), eval_count=8)
    write_jsonl(train + held_out, home / "data" / "tasks.jsonl")
    return {"teacher": "teacher", "student": "student", "dataset": "tasks.jsonl"}


@contextmanager
def redis_db() -> Iterator[str]:
    """A Redis database number of our own (claimed like the test fixtures claim theirs)."""
    from service.scratch import redis_database

    with redis_database(*REDIS) as number:
        yield f"redis://{REDIS[0]}:{REDIS[1]}/{number}"


@contextmanager
def database(backend: str, home: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{home / 'bench.db'}"
        return
    from service.scratch import postgres_schema

    with postgres_schema(PG_URL, prefix="tvkd_bench") as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api_process(env: dict[str, str], args: argparse.Namespace, log: Path) -> Iterator[str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "tvkd.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(args.workers), "--log-level", "warning"]
    if not args.access_log:
        cmd.append("--no-access-log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the API did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------------------------
# Clients


class RawClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams: just enough protocol for this API
    (Content-Length bodies), and a small fraction of a general client's CPU per request."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {KEY}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class HttpxClient:
    def __init__(self, url: str) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        response = await self.client.request(method, path, content=body, headers=headers)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


def make_client(kind: str, url: str) -> Any:
    if kind == "httpx":
        return HttpxClient(url)
    host, port = url.removeprefix("http://").split(":")
    return RawClient(host, int(port))


@dataclass
class Samples:
    ms: dict[str, list[float]] = field(default_factory=lambda: {"create": [], "get": []})
    errors: dict[str, int] = field(default_factory=dict)


async def timed(
    client: Any, samples: Samples, op: str, method: str, path: str, body: bytes | None = None
) -> bytes:
    t0 = time.perf_counter()
    status, data = await client.request(method, path, body)
    samples.ms[op].append((time.perf_counter() - t0) * 1e3)
    if status >= 300:
        samples.errors[f"{op} {status}"] = samples.errors.get(f"{op} {status}", 0) + 1
    return data


async def one_client(
    url: str, spec: bytes, args: argparse.Namespace, think: float, samples: Samples, start: asyncio.Event
) -> None:
    client = make_client(args.client, url)
    # Paced clients think for a random time around `think` (uniform, ±50%) and start at a random
    # offset: clients that all fired at the same instant would measure a burst, not a load.
    rng = random.Random()

    async def pause() -> None:
        if think:
            await asyncio.sleep(think * rng.uniform(0.5, 1.5))

    try:
        await start.wait()
        if think:
            await asyncio.sleep(think * rng.random())
        for _ in range(args.rounds):
            job = json.loads(await timed(client, samples, "create", "POST", "/v1/jobs", spec))
            for _ in range(args.gets):
                await pause()
                await timed(client, samples, "get", "GET", f"/v1/jobs/{job['id']}")
            await pause()
    finally:
        await client.close()


async def load(url: str, spec: bytes, args: argparse.Namespace, think: float) -> tuple[Samples, float]:
    samples = Samples()
    start = asyncio.Event()
    tasks = [
        asyncio.create_task(one_client(url, spec, args, think, samples, start)) for _ in range(args.clients)
    ]
    await asyncio.sleep(0.2)  # every client connected and waiting
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return samples, time.perf_counter() - t0


def warm_up(url: str, spec: bytes, n: int, connections: int) -> None:
    """`n` create+get rounds on each of `connections` parallel connections: with several uvicorn
    workers a keep-alive connection stays with one process, and every process must load its
    model-check cache (and its broker connection) before the timed runs."""
    import httpx

    def rounds(_: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            for _ in range(n):
                response = http.post("/v1/jobs", content=spec, headers={"Content-Type": "application/json"})
                response.raise_for_status()
                http.get(f"/v1/jobs/{response.json()['id']}").raise_for_status()

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(rounds, range(connections)))


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# --------------------------------------------------------------------------------------------


def table_rows(backend: str, think_ms: float, samples: Samples, seconds: float) -> list[list[object]]:
    rows: list[list[object]] = []
    total = sum(len(v) for v in samples.ms.values())
    for op, ms in samples.ms.items():
        p99 = percentile(ms, 99)
        rows.append(
            [
                backend,
                "closed loop" if think_ms == 0 else f"{think_ms:g} ms",
                op,
                len(ms),
                statistics.median(ms),
                p99,
                max(ms),
                f"< {TARGETS_MS[op]:.0f}",
                "yes" if p99 < TARGETS_MS[op] else "NO",
                total / seconds,
            ]
        )
    return rows


def run_backend(backend: str, args: argparse.Namespace, broker: str) -> list[list[object]]:
    home = Path(tempfile.mkdtemp(prefix=f"tvkd-bench-{backend}-"))
    try:
        assets = make_assets(home)
        with database(backend, home) as db_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("TVKD_")}
            env.update(
                TVKD_HOME=str(home),
                TVKD_DATABASE_URL=db_url,
                TVKD_BROKER_URL=broker,
                TVKD_ARTIFACT_ROOT=str(home / "artifacts"),
                TVKD_MODEL_ROOTS=str(home / "models"),
                TVKD_DATA_ROOTS=str(home / "data"),
                TVKD_API_KEYS=f"bench={KEY}",
                TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1",
            )
            spec = json.dumps(
                {**assets, "alpha": 0.7, "beta": 0.1, "hyperparameters": {"epochs": 1}}
            ).encode()
            rows: list[list[object]] = []
            with api_process(env, args, home / "api.log") as url:
                warm_up(url, spec, 3 if args.smoke else 10, connections=4 * args.workers)
                for think_ms in args.think_ms:
                    samples, seconds = asyncio.run(load(url, spec, args, think_ms / 1e3))
                    if samples.errors:
                        print(f"{backend}: non-2xx responses: {samples.errors}", file=sys.stderr)
                    rows += table_rows(backend, think_ms, samples, seconds)
        return rows
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite", help="comma list of sqlite, postgresql")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20, help="creates per client")
    parser.add_argument("--gets", type=int, default=1, help="gets after each create")
    parser.add_argument(
        "--think-ms",
        default="0,200,500",
        help="comma list of pauses between a client's requests, one load run each (0 = closed loop)",
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument("--access-log", action="store_true", help="let uvicorn log every request")
    parser.add_argument("--smoke", action="store_true", help="a few requests: checks the script only")
    args = parser.parse_args()
    args.think_ms = [float(x) for x in str(args.think_ms).split(",") if x.strip()]
    if args.smoke:
        args.clients, args.rounds = min(args.clients, 4), min(args.rounds, 2)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows: list[list[object]] = []
    with redis_db() as broker:
        for backend in backends:
            rows += run_backend(backend, args, broker)
    print(
        f"api latency: {args.clients} clients x {args.rounds} rounds of (create + {args.gets} get), "
        f"{args.client} client, uvicorn workers {args.workers}, "
        f"access log {'on' if args.access_log else 'off'}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (other processes skew the numbers)"
    )
    headers = [
        "backend",
        "think",
        "op",
        "n",
        "p50 ms",
        "p99 ms",
        "max ms",
        "target p99",
        "met",
        "req/s (all)",
    ]
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
