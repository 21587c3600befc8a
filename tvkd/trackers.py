"""Experiment trackers: a job's metrics, settings and model in TensorBoard, MLflow or W&B.

A job lists its trackers in `report_to` (`JobOptions.report_to`, TRL's name); `TrackerSettings`
says where their runs go (the CLI: flags and the trackers' own environment variables; the server:
its settings). `open_trackers` returns a `Callbacks` to add to a job's callbacks, and is closed with
the final model's folder. Each tracker is driven through its own library: `SummaryWriter`
(torch.utils.tensorboard, event files), `mlflow.MlflowClient` (an explicit tracking URI, no global
state: a worker runs many jobs) and `wandb.init` (a `Run` object).

What each receives (the names of transformers' integrations, so that a tvkd run and a TRL run
show the same names in the same tool):
- metrics: the job's own names (TRL's: `loss`, `rewards/accuracies`, `tvkd/...`, `grad_norm`,
  `lr`, `epoch`) at each optimizer step they are reported; held-out metrics are `eval_<name>`
  as `Trainer.log` names them. MLflow logs those keys; TensorBoard and W&B log them through
  `transformers.integrations.rewrite_logs` (`train/loss`, `eval/loss`), as TRL's callbacks do.
- settings: every job setting as a parameter (MLflow params, the W&B config, TensorBoard's
  `config` text).
- the model: the final model folder's path (MLflow tag `model_dir`, W&B summary `model_dir`,
  TensorBoard text `model_dir`); with `log_model` also the folder itself (an MLflow artifact
  `model/`, a W&B artifact of type `model`).

Only the main process reports (rank 0: `RANK` unset or 0, and rank 0 of an initialised
torch.distributed group). A job that runs again (a resume, a retry) continues the same run: the
TensorBoard writer purges steps from the resumed one on, MLflow reuses the run tagged with the
run name, W&B resumes the run whose id is the run name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvkd.callbacks import Callbacks, Split
from tvkd.config import REPORTERS, ConfigError

MLFLOW_RUN_TAG = "tvkd.run"


@dataclass
class TrackerSettings:
    """Where the trackers' runs go. Paths may be relative (to the working directory)."""

    run_name: str  # the run's name (and W&B id) in every tracker: a job id, or the output folder's name
    tensorboard_dir: str  # event files go to <tensorboard_dir>/<run_name>
    mlflow_tracking_uri: str  # a URI (http://…, sqlite:///…, file:…) or a folder (a file store)
    mlflow_experiment: str = "tvkd"
    wandb_project: str = "tvkd"
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_dir: str | None = None  # the folder W&B writes its run folders under (None: W&B's default)
    log_model: bool = False  # also upload the final model folder (MLflow/W&B artifact), not just its path

    @classmethod
    def for_output(
        cls, output_dir: str | os.PathLike, *, run_name: str | None = None, logging_dir: str | None = None
    ) -> TrackerSettings:
        """The CLI's defaults for a job writing to `output_dir`: TensorBoard under
        `output_dir/runs` (or `logging_dir`, TRL's name), MLflow at `MLFLOW_TRACKING_URI` else a
        file store in `output_dir/mlruns`, W&B from `WANDB_PROJECT`/`WANDB_MODE` (default
        offline, no network) with its run folders under `WANDB_DIR` else `output_dir`."""
        out = Path(output_dir)
        env = os.environ.get
        return cls(
            run_name=run_name or out.resolve().name,
            tensorboard_dir=logging_dir or str(out / "runs"),
            mlflow_tracking_uri=env("MLFLOW_TRACKING_URI") or str(out / "mlruns"),
            mlflow_experiment=env("MLFLOW_EXPERIMENT_NAME") or "tvkd",
            wandb_project=env("WANDB_PROJECT") or "tvkd",
            wandb_mode=env("WANDB_MODE") or "offline",
            wandb_dir=env("WANDB_DIR") or str(out),
            log_model=env("TVKD_LOG_MODEL", "").lower() in ("1", "true", "yes"),
        )


def is_main_process() -> bool:
    """Rank 0 of the launch (`RANK`, set by torchrun/accelerate) and of torch.distributed if up."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return False
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def hf_logs(metrics: Mapping[str, float], split: Split) -> dict[str, float]:
    """The keys `transformers.Trainer.log` gives these metrics: train as is, held-out `eval_<name>`."""
    prefix = "eval_" if split == "eval" else ""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def _rewrite(logs: Mapping[str, float]) -> dict[str, float]:
    from transformers.integrations.integration_utils import rewrite_logs

    return rewrite_logs(dict(logs))


class _Tracker:
    """One tracker's run: `start` (settings), `log` (HF-named metrics), `finish` (model, status)."""

    def start(self, config: Mapping[str, Any], start_step: int) -> None: ...
    def log(self, step: int, logs: Mapping[str, float]) -> None: ...
    def finish(self, model_dir: str | None, status: str) -> None: ...


class _TensorBoard(_Tracker):
    def __init__(self, settings: TrackerSettings) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.SummaryWriter = SummaryWriter
        self.log_dir = Path(settings.tensorboard_dir) / settings.run_name
        self.writer: Any = None

    def start(self, config: Mapping[str, Any], start_step: int) -> None:
        # purge_step: TensorBoard drops what an earlier attempt logged after the resumed step.
        self.writer = self.SummaryWriter(
            log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step else None
        )
        self.writer.add_text("config", json.dumps(dict(config), indent=2, default=str), start_step)

    def log(self, step: int, logs: Mapping[str, float]) -> None:
        for key, value in _rewrite(logs).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, model_dir: str | None, status: str) -> None:
        if self.writer is None:
            return
        if model_dir:
            self.writer.add_text("model_dir", model_dir)
        self.writer.close()


def _mlflow_uri(uri: str) -> str:
    """A folder (or file: URI) is MLflow's file store, which MLflow 3 keeps behind an opt-in.

    Raises ConfigError for a file store inside a folder named `artifacts`: MLflow's file store
    takes no run from such a path (it guards against runs inside a run's artifacts folder)."""
    if "://" in uri and not uri.startswith("file:"):
        return uri
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    path = Path(url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri).resolve()
    if "artifacts" in path.parts:
        raise ConfigError(
            "report_to",
            f"an MLflow file store cannot lie inside a folder named 'artifacts' ({path}): "
            "choose another folder or a tracking server (MLFLOW_TRACKING_URI / TVKD_MLFLOW_TRACKING_URI)",
        )
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return path.as_uri()


class _MLflow(_Tracker):
    def __init__(self, settings: TrackerSettings) -> None:
        from mlflow import MlflowClient

        self.settings = settings
        self.client = MlflowClient(tracking_uri=_mlflow_uri(settings.mlflow_tracking_uri))
        self.run_id: str | None = None

    def start(self, config: Mapping[str, Any], start_step: int) -> None:
        from mlflow.entities import Param

        name, client = self.settings.mlflow_experiment, self.client
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        tag = f"tags.`{MLFLOW_RUN_TAG}` = '{self.settings.run_name}'"
        found = client.search_runs([experiment_id], filter_string=tag, max_results=1)
        if found:  # the same job again (resume, retry): continue its run
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(
                experiment_id, run_name=self.settings.run_name, tags={MLFLOW_RUN_TAG: self.settings.run_name}
            )
        self.run_id = run.info.run_id
        # A logged parameter cannot change: a retry that changed one (OOM: batch_size) keeps the first.
        params = [Param(k, _param_text(v)) for k, v in config.items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, logs: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in logs.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, model_dir: str | None, status: str) -> None:
        if self.run_id is None:
            return
        if model_dir:
            self.client.set_tag(self.run_id, "model_dir", model_dir)
            if self.settings.log_model:
                self.client.log_artifacts(self.run_id, model_dir, artifact_path="model")
        mlflow_status = {"completed": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def wandb_id(run_name: str) -> str:
    """A W&B run id from a run name (W&B ids take no `/\\#?%:`, at most 64 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run_name)[:64]


class _Wandb(_Tracker):
    def __init__(self, settings: TrackerSettings) -> None:
        import wandb

        self.wandb, self.settings, self.run = wandb, settings, None

    def start(self, config: Mapping[str, Any], start_step: int) -> None:
        s = self.settings
        if s.wandb_dir:
            Path(s.wandb_dir).mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=s.wandb_project,
            name=s.run_name,
            id=wandb_id(s.run_name),
            resume="allow",
            mode=s.wandb_mode,  # type: ignore[arg-type]
            dir=s.wandb_dir,
            config=dict(config),
            allow_val_change=True,
            reinit="create_new",  # a worker process runs many jobs, one run each
            settings=self.wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False),
        )

    def log(self, step: int, logs: Mapping[str, float]) -> None:
        self.run.log(_rewrite(logs), step=step)

    def finish(self, model_dir: str | None, status: str) -> None:
        if self.run is None:
            return
        if model_dir:
            self.run.summary["model_dir"] = model_dir
            if self.settings.log_model:
                artifact = self.wandb.Artifact(f"model-{wandb_id(self.settings.run_name)}", type="model")
                artifact.add_dir(model_dir)
                self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status in ("completed", "stopped") else 1)


_TRACKERS: dict[str, type[_Tracker]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


class TrackerCallbacks(Callbacks):
    """Reports a job's metrics to its trackers; the runs start at the `train` stage (their settings
    logged then) and end with `close(model_dir, status)`."""

    def __init__(self, trackers: Sequence[_Tracker], config: Mapping[str, Any]) -> None:
        self.trackers, self.config = list(trackers), dict(config)
        self.started = False

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "train" and not self.started:
            for tracker in self.trackers:
                tracker.start(self.config, int(info.get("start_step", 0)))
            self.started = True

    def on_metrics(self, step: int, metrics: dict[str, float], split: Split) -> None:
        if not self.started:
            return
        logs = hf_logs(metrics, split)
        for tracker in self.trackers:
            tracker.log(step, logs)

    def close(self, model_dir: str | None, status: str) -> None:
        """End every run: `status` completed | stopped | failed; the model folder's path (or None)."""
        if not self.started:
            return
        self.started = False
        for tracker in self.trackers:
            tracker.finish(model_dir, status)


def open_trackers(
    report_to: Sequence[str], settings: TrackerSettings, config: Mapping[str, Any]
) -> TrackerCallbacks | None:
    """The trackers of `report_to` (None when empty, or on a process other than rank 0).

    `config` is the job's settings, flat (`tvkd.config.flat_settings`). Raises ConfigError naming
    `report_to` for an unknown tracker or one whose library is not installed.
    """
    if not report_to or not is_main_process():
        return None
    trackers = []
    for name in report_to:
        if name not in _TRACKERS:
            raise ConfigError("report_to", f"unknown tracker {name!r}; choose from {', '.join(REPORTERS)}")
        try:
            trackers.append(_TRACKERS[name](settings))
        except ImportError as exc:
            raise ConfigError(
                "report_to", f"{name} needs `pip install {_PACKAGES[name]}` (or tvkd[trackers]): {exc}"
            ) from exc
    return TrackerCallbacks(trackers, {"run_name": settings.run_name, **config})
