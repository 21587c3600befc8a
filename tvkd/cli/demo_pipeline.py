"""`tvkd demo` (the default): the paper's whole pipeline through the service, on models and data
built offline in seconds, ending with the student's gold accuracy before → after.

1. Builds (or reuses) under TVKD_HOME a character-level task world (`tvkd.taskworld`: addition,
   sorting, reversal, with a gold checker; the demonstrations use a wrong procedure 40% of the
   time) and two small random Llamas with a one-token-per-character tokenizer, the teacher larger
   than the student (`tvkd.demo_world`).
2. Starts the API, two workers (`--workers`) and the dashboard (`tvkd up`) and submits six jobs
   over REST, chained by `job:<id>` (all at once; the later ones wait): teacher SFT → teacher
   DPO; student SFT; then
   the SFT student distilled three ways from the DPO teacher: DPO (α 0), TVKD as the paper
   describes it (α 0.7, the teacher's logits as Q, γ 1), and the setting README "Does it work?"
   recommends (`sft_weight` 1 with the teacher's implicit DPO reward as its values,
   `teacher_reference` = the teacher SFT job). A progress line every few seconds.
3. Prints the table: each distilled job's gold accuracy on the held-out prompts before (the SFT
   student) → after, the teacher's shaping accuracy on the training pairs, the held-out
   `rewards/accuracies`; and the teacher's gold accuracy after SFT and after DPO.

The evaluate stage of each job measures gold accuracy (`gen/gold_accuracy`, the dataset's declared
checker). The held-out prompts are the `test` split; `--split dev` reports the dev split instead
(what the settings below were calibrated on: never the test split). A second run reuses the
models, the data, the value stores and the finished jobs (Idempotency-Keys) and prints the table in
seconds. Ctrl-C stops every process the demo started.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvkd.cli.client import call, connect, describe_error
from tvkd.cli.demo_common import follow_lines, idempotency_key, keep_serving, log
from tvkd.demo_world import CharModel, WorldData

PAPER_ALPHA = 0.7


@dataclass(frozen=True)
class Scale:
    """Sizes and steps of one demo pipeline (every job runs on one CPU thread)."""

    data: WorldData
    teacher: CharModel
    student: CharModel
    teacher_sft_steps: int
    teacher_dpo_steps: int
    student_sft_steps: int
    distill_steps: int
    sft_batch: int = 64
    pref_batch: int = 32
    sft_lr: float = 3e-3
    pref_lr: float = 1e-3
    beta: float = 0.1  # DPO β of the teacher and the student; β_v of the implicit values
    max_length: int = 32
    gen_prompts: int = 0  # 0: every held-out prompt


SCALES: dict[str, Scale] = {
    # Calibrated on the dev split (see README "What scripts/demo.sh does").
    "demo": Scale(
        data=WorldData(
            sizes=dict(
                teacher_sft=4000, teacher_pref=600, student_sft=2000, student_pref=400, dev=256, test=256
            )
        ),
        teacher=CharModel(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=384, seed=1),
        student=CharModel(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=192, seed=2),
        teacher_sft_steps=800,
        teacher_dpo_steps=200,
        student_sft_steps=600,
        distill_steps=200,
    ),
    # The reduced form the tests run (tests/service/test_demo_pipeline.py): it shows the chain and
    # the table, not learning.
    "tiny": Scale(
        data=WorldData(
            sizes=dict(teacher_sft=64, teacher_pref=16, student_sft=64, student_pref=16, dev=8, test=8),
            pairs_per_prompt=2,
        ),
        teacher=CharModel(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1),
        student=CharModel(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=2),
        teacher_sft_steps=3,
        teacher_dpo_steps=2,
        student_sft_steps=3,
        distill_steps=2,
        sft_batch=8,
        pref_batch=4,
    ),
}


@dataclass(frozen=True)
class Assets:
    """Names under the service's model and data roots (as API users give them)."""

    teacher: str
    student: str
    data: dict[str, str]  # dataset name → path relative to the data root


def prepare_assets(home: Path, scale: Scale) -> Assets:
    """Build (or reuse) the two models and the task world's datasets under `home`."""
    from tvkd.demo_world import build_char_model, write_world_data

    models, data_root = home / "models", home / "data"
    names = {}
    for role, shape in (("teacher", scale.teacher), ("student", scale.student)):
        name = names[role] = (
            f"taskworld-{role}-{shape.hidden_size}x{shape.num_layers}-f{shape.intermediate_size}-s{shape.seed}"
        )
        if not (models / name / "tvkd_source.json").exists():
            build_char_model(models / name, shape)
    folder = data_root / "taskworld" / scale.data.key()
    paths = write_world_data(folder, scale.data)
    return Assets(
        names["teacher"], names["student"], {k: str(p.relative_to(data_root)) for k, p in paths.items()}
    )


@dataclass
class Job:
    """One of the pipeline's jobs: its request and, once submitted, its id."""

    name: str
    short: str  # its label in the progress line
    body: dict[str, Any]
    id: str = ""
    reused: bool = False


def submit(client: Any, assets: Assets, scale: Scale, *, split: str = "test", seed: int = 0) -> list[Job]:
    """Submit the six jobs (each naming earlier ones as `job:<id>`); returns them in order.

    Raises `tvkd.cli.client.ClientError` when the API refuses one (its error line)."""
    from tvkd.cli.client import ClientError

    held_out = assets.data[split]
    gen = {"gen_prompts": scale.gen_prompts or scale.data.sizes[split], "gen_max_new_tokens": 8}
    common = {"max_length": scale.max_length, "seed": seed, "save_every": 0}
    sft_hp = {**common, "batch_size": scale.sft_batch, "learning_rate": scale.sft_lr}
    pref_hp = {
        **common, **gen, "batch_size": scale.pref_batch, "learning_rate": scale.pref_lr, "num_samples": 4,
        "eval_dataset": held_out, "log_every": 10,
    }  # fmt: skip
    jobs: dict[str, Job] = {}

    def post(job: Job) -> Job:
        r = client.post("/v1/jobs", json=job.body, headers={"Idempotency-Key": idempotency_key(job.body)})
        if r.status_code not in (200, 201):
            raise ClientError(f"the API refused the {job.name} job: {describe_error(r)}")
        job.id, job.reused = r.json()["id"], r.status_code == 200
        jobs[job.name] = job
        return job

    def ref(name: str) -> str:
        return f"job:{jobs[name].id}"

    d = assets.data
    post(Job("teacher SFT", "t-sft", {
        "kind": "sft", "student": assets.teacher, "dataset": d["teacher_sft"],
        "hyperparameters": {**sft_hp, "max_steps": scale.teacher_sft_steps, "log_every": 50},
        "metadata": {"demo": "teacher-sft"},
    }))  # fmt: skip
    post(Job("teacher DPO", "t-dpo", {
        "kind": "dpo", "student": ref("teacher SFT"), "dataset": d["teacher_pref"], "beta": scale.beta,
        "hyperparameters": {**pref_hp, "max_steps": scale.teacher_dpo_steps},
        "metadata": {"demo": "teacher-dpo"},
    }))  # fmt: skip
    post(Job("student SFT", "s-sft", {
        "kind": "sft", "student": assets.student, "dataset": d["student_sft"],
        "hyperparameters": {**sft_hp, "max_steps": scale.student_sft_steps, "log_every": 50},
        "metadata": {"demo": "student-sft"},
    }))  # fmt: skip
    distill = {
        "teacher": ref("teacher DPO"), "student": ref("student SFT"), "dataset": d["student_pref"],
        "beta": scale.beta,
    }  # fmt: skip
    steps = {**pref_hp, "max_steps": scale.distill_steps}
    post(Job("DPO (α 0)", "dpo", {
        "kind": "dpo", "student": ref("student SFT"), "dataset": d["student_pref"], "beta": scale.beta,
        "hyperparameters": steps, "metadata": {"demo": "dpo"},
    }))  # fmt: skip
    post(Job(f"TVKD (α {PAPER_ALPHA:g}, paper)", "tvkd", {
        **distill, "alpha": PAPER_ALPHA, "hyperparameters": steps, "metadata": {"demo": "tvkd-paper"},
    }))  # fmt: skip
    post(Job("recommended", "rec", {
        **distill, "alpha": PAPER_ALPHA,
        "hyperparameters": {
            **steps, "q_source": "implicit", "value_beta": scale.beta,
            "teacher_reference": ref("teacher SFT"), "sft_weight": 1.0,
        },
        "metadata": {"demo": "recommended"},
    }))  # fmt: skip
    return list(jobs.values())


def _state(job: dict[str, Any]) -> str:
    if job["status"] in ("succeeded", "failed", "cancelled", "waiting"):
        return job["status"]
    frac = job["progress"].get("fraction")
    return f"{job['stage']}" + (f" {100 * frac:.0f}%" if frac else "")


def follow(client: Any, jobs: list[Job], *, every: float = 5.0, out: Any = None) -> dict[str, dict[str, Any]]:
    """Poll until every job is terminal, printing one progress line every `every` seconds (and
    when a job finishes); returns the final job objects by name."""
    short = {j.name: j.short for j in jobs}

    def describe(name: str, job: dict[str, Any]) -> str:
        return f"{short[name]} {_state(job)}"

    return follow_lines(client, {j.name: j.id for j in jobs}, describe, every=every, out=out)


def _teacher_shaping(client: Any, job_id: str) -> float | None:
    points = call(
        client, "GET", f"/v1/jobs/{job_id}/metrics",
        params={"split": "teacher", "name": "teacher/shaping_accuracy"},
    )["data"]  # fmt: skip
    return float(points[-1]["value"]) if points else None


def _gen(client: Any, job_id: str) -> dict[str, dict[str, float]]:
    doc = call(client, "GET", f"/v1/jobs/{job_id}/generations", params={"limit": 1})
    return {"before": doc["before"], "after": doc["after"]}


def seconds(job: dict[str, Any]) -> float | None:
    from datetime import datetime

    if not job.get("started_at") or not job.get("finished_at"):
        return None
    start, end = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    return (end - start).total_seconds()


GOLD = "gen/gold_accuracy"
COLUMNS = ("job", "gold before", "gold after", "change", "teacher shaping acc", "held-out rewards/acc", "s")


def collect(client: Any, jobs: list[Job], state: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows (`COLUMNS`): the teacher's gold after SFT and after DPO, then each
    distilled job's gold before → after. Raises ClientError when a job did not succeed."""
    from tvkd.cli.client import ClientError

    for j in jobs:
        if state[j.name]["status"] != "succeeded":
            err = state[j.name].get("error") or {}
            raise ClientError(f"the {j.name} job ended {state[j.name]['status']}: {err.get('message', err)}")
    rows: dict[str, dict[str, Any]] = {}
    for j in jobs:
        s = state[j.name]
        row = rows[j.name] = dict.fromkeys(COLUMNS)
        row["job"] = j.name if j.name.split()[0] in ("teacher", "student") else f"student {j.name}"
        row["s"] = seconds(s)
        if s["kind"] == "sft":
            continue  # its gold: the "before" of the jobs that train its model, below
        gen = _gen(client, j.id)
        row["gold before"], row["gold after"] = gen["before"].get(GOLD), gen["after"].get(GOLD)
        if row["gold before"] is not None and row["gold after"] is not None:
            row["change"] = row["gold after"] - row["gold before"]
        row["teacher shaping acc"] = _teacher_shaping(client, j.id) if s["kind"] == "tvkd" else None
        row["held-out rewards/acc"] = ((s.get("result") or {}).get("eval_metrics") or {}).get(
            "rewards/accuracies"
        )
    rows["teacher SFT"]["gold after"] = rows["teacher DPO"]["gold before"]
    rows["student SFT"]["gold after"] = rows[jobs[3].name]["gold before"]
    order = ["teacher SFT", "teacher DPO", "student SFT", *(j.name for j in jobs[3:])]
    return [rows[name] for name in order]


def verdict(rows: list[dict[str, Any]]) -> str:
    """One line: which distilled students ended above their SFT start in gold accuracy."""
    distilled = [r for r in rows if r["change"] is not None and r["job"].startswith("student")]
    above = [r["job"].removeprefix("student ") for r in distilled if r["change"] > 0]
    if not above:
        return "No distilled student ended above its SFT start in gold accuracy."
    return f"Ended above the SFT student's gold accuracy: {', '.join(above)} (of {len(distilled)})."


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "—"
    if column == "change":
        return f"{100 * value:+.1f} pt"
    if column == "s":
        return f"{value:.0f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of `collect`'s rows."""
    cells = [[c, *(_cell(c, r[c]) for r in rows)] for c in COLUMNS]
    widths = [max(len(x) for x in col) for col in cells]
    lines = [
        " | ".join(col[i].ljust(w) for col, w in zip(cells, widths, strict=True)).rstrip()
        for i in range(len(rows) + 1)
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import os

    from tvkd.cli.client import ClientError

    try:
        from service.settings import Settings
        from tvkd.cli.up import start_stack
    except ImportError:
        print("tvkd demo needs the service extras: pip install 'tvkd[service,dashboard]'", file=sys.stderr)
        return 2
    # One torch thread per process: on a shared or small CPU, more threads spin against each other
    # (measured here: a step 10x slower with 2 threads on a loaded 2-core machine).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    scale = SCALES[args.scale]
    home = Settings().home_dir
    assets = prepare_assets(home, scale)
    log(f"models and data ready in {home} ({time.perf_counter() - t0:.0f} s); starting the service")
    try:
        stack = start_stack(
            port=args.port,
            dashboard_port=None if args.no_dashboard else args.dashboard_port,
            workers=args.workers,
        )
    except RuntimeError as exc:  # e.g. the port is taken: the API's log says so
        log(f"the service did not start: {exc}")
        return 1
    try:
        if stack.dashboard_url:
            log(f"dashboard: {stack.dashboard_url}   (API {stack.api_url}, key in {home / 'api_key'})")
        with connect(stack.api_url, stack.api_key, timeout=30) as client:
            jobs = submit(client, assets, scale, split=args.split, seed=args.seed)
            for j in jobs:
                log(f"{j.short:5s} = {j.name:21s} {j.id}" + (" (reused)" if j.reused else ""))
            state = follow(client, jobs)
            rows = collect(client, jobs, state)
        print(f"\nGold accuracy of greedy answers to the {scale.data.sizes[args.split]} held-out "
              f"({args.split}) prompts; teacher shaping acc = teacher/shaping_accuracy on the "
              "training pairs; s = the job's seconds.\n")  # fmt: skip
        print(render(rows))
        print("\n" + verdict(rows))
        print(f"\ndemo took {time.perf_counter() - t0:.0f} s")
        keep_serving(stack, args.keep_running)
        return 0
    except ClientError as exc:
        log(str(exc))
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping the service")
        return 130
    finally:
        stack.stop()
