"""Service settings, read from the environment (and a `.env` file) with the TVKD_ prefix.

Defaults are the embedded ones: everything under one home folder (TVKD_HOME, default
`./.tvkd`): a SQLite database, the artifact root, and (when TVKD_BROKER_URL is empty) kombu's
filesystem transport as the Celery broker, so that `tvkd up` needs no server at all.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from tvkd.trackers import TrackerSettings

PathList = Annotated[list[str], NoDecode]


def _split_list(value: object) -> object:
    """`a:b` / `a,b` / JSON-free lists from the environment → list of strings."""
    if isinstance(value, str):
        sep = "," if "," in value else os.pathsep
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service, the workers and the clients (README: Configuration)."""

    model_config = SettingsConfigDict(env_prefix="TVKD_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path(".tvkd"), description="Home folder of the embedded defaults.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite file in TVKD_HOME.")
    broker_url: str = Field(default="", description="Celery broker (redis://…); empty = embedded broker.")
    artifact_root: Path | None = Field(
        default=None, description="Artifacts root; empty = TVKD_HOME/artifacts."
    )
    model_roots: PathList = Field(
        default_factory=list,
        description="Folders models are read from (`:` or `,` separated); empty = TVKD_HOME/models.",
    )
    data_roots: PathList = Field(
        default_factory=list, description="Folders datasets are read from; empty = TVKD_HOME/data."
    )
    api_keys: PathList = Field(
        default_factory=list,
        description="API keys created at start-up, `name=key` or `key`, comma separated, each at least 32 "
        "characters (stored as HMAC digests).",
    )
    secret_key: str = Field(
        default="",
        description="Server secret of the API-key digests (HMAC-SHA256), at least 32 characters; empty = "
        "generated once into TVKD_HOME/secret_key (0600). Every API process and `tvkd keys` need the same.",
    )
    api_url: str = Field(default="http://127.0.0.1:8000", description="API base URL for clients/dashboard.")
    api_key: str = Field(
        default="",
        description="API key of the CLI client; the dashboard uses it only behind TVKD_DASHBOARD_PASSWORD.",
    )
    dashboard_password: str = Field(
        default="",
        description="Dashboard login by a shared password (at least 12 characters), acting with "
        "TVKD_API_KEY; empty = each visitor logs in with their own API key.",
    )
    dashboard_allow_url: bool = Field(
        default=False,
        description="Let dashboard visitors type another API URL at login (own-key login only).",
    )
    allow_hub: bool = Field(default=False, description="Accept Hugging Face hub ids (needs network).")
    trust_remote_code: bool = Field(default=False, description="Allow models with custom code.")
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, description="Largest dataset upload.")
    upload_max_decompressed_bytes: int = Field(
        default=256 * 1024 * 1024,
        description="Largest dataset upload after decompression (.gz), in bytes; past it: 413.",
    )
    upload_max_rows: int = Field(
        default=1_000_000, description="Most rows of an uploaded dataset (413 past it)."
    )
    upload_max_line_bytes: int = Field(
        default=8 * 1024 * 1024, description="Longest line of an uploaded JSONL dataset, in bytes (413)."
    )
    upload_max_depth: int = Field(
        default=64, description="Deepest JSON nesting of a dataset row (deeper rows are bad rows: 422)."
    )
    upload_idle_seconds: float = Field(
        default=30.0, description="An upload whose body sends nothing for this long is cut off (408)."
    )
    limit_max_steps: int = Field(default=1_000_000, description="Largest `max_steps` a job may ask for.")
    limit_epochs: float = Field(default=1000.0, description="Largest `epochs` a job may ask for.")
    limit_batch_size: int = Field(default=4096, description="Largest `batch_size` a job may ask for.")
    limit_grad_accum: int = Field(
        default=4096, description="Largest `grad_accum` (gradient accumulation steps) a job may ask for."
    )
    limit_max_length: int = Field(default=131_072, description="Largest `max_length` a job may ask for.")
    limit_num_samples: int = Field(default=1000, description="Largest `num_samples` a job may ask for.")
    limit_num_processes: int = Field(
        default=8,
        ge=1,
        description="Largest `num_processes` (devices of one train stage, under torchrun) a job may ask "
        "for; the broker has a train queue per size up to it (`train`, `train.n2`, …).",
    )
    max_model_layers: int = Field(
        default=512, description="Most layers a teacher or student config may declare (422 at submit)."
    )
    max_model_parameters: float = Field(
        default=2e11,
        description="Most parameters a teacher or student config may make, estimated from config.json "
        "before any weights are built (422 at submit).",
    )
    max_json_body_bytes: int = Field(
        default=1024 * 1024, description="Largest JSON request body, in bytes (413 past it)."
    )
    heartbeat_seconds: float = Field(default=5.0, description="How often a running job beats.")
    heartbeat_timeout: float = Field(default=60.0, description="A job silent this long is re-enqueued.")
    requeue_after: float = Field(default=120.0, description="A queued job untouched this long is re-sent.")
    queue_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_.-]{0,64}$",
        description="Prefix of this deployment's broker queue names (`<prefix>.default`, `.precompute`, "
        "`.train`), so deployments sharing a broker database never take each other's messages; "
        "empty = `tvkd-` and 8 hex digits of the database URL (without its password).",
    )
    max_resends: int = Field(
        default=5,
        ge=0,
        description="How many times the reconciler re-sends a job's stage (its worker died, its message "
        "was lost) before the job fails with `retries_exhausted`.",
    )
    device: str = Field(
        default="auto",
        description="Torch device of the workers: auto (cuda when available), cpu, cuda, cuda:1.",
    )
    worker_devices: int = Field(
        default=0,
        ge=0,
        description="Devices a worker advertises: it takes train stages of jobs with num_processes up to "
        "this many (queues `train`, `train.n2`, …); 0 = the CUDA device count, 1 without CUDA (a CPU "
        "worker running N gloo processes sets N).",
    )
    precompute_shard_tasks: int = Field(
        default=4,
        ge=1,
        description="Most tasks one job's teacher precompute is split into on the `precompute` queue: "
        "K = min(this, the store's shards); the stage's task and K-1 shard tasks compute shards of the "
        "same store, so K workers share one job (README 'Scaling'). 1 = one task per job.",
    )
    precompute_shard_size: int = Field(
        default=256,
        ge=1,
        description="Pairs per value-store shard in the workers' precompute: the unit a shard task "
        "computes and a killed precompute redoes (not part of the store's key).",
    )
    tensorboard_dir: Path | None = Field(
        default=None,
        description="TensorBoard root of jobs with `report_to: [tensorboard]` (a folder per job id); "
        "empty = <artifact root>/tensorboard.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        description="MLflow tracking URI of `report_to: [mlflow]` jobs (a run per job id); empty = a file "
        "store in TVKD_HOME/mlruns (not under the artifact root: MLflow's file store takes no path through "
        "a folder named 'artifacts'). Several machines: a tracking server's URI.",
    )
    mlflow_experiment: str = Field(default="tvkd", description="MLflow experiment of the jobs' runs.")
    wandb_project: str = Field(default="tvkd", description="W&B project of `report_to: [wandb]` jobs.")
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        default="offline",
        description="W&B mode: offline (run folders under TVKD_WANDB_DIR; `wandb sync` uploads them), "
        "online (needs WANDB_API_KEY and network) or disabled.",
    )
    wandb_dir: Path | None = Field(
        default=None, description="Where W&B writes its run folders; empty = <artifact root>/wandb."
    )
    log_model: bool = Field(
        default=False,
        description="Upload each reporting job's final model folder to MLflow/W&B as an artifact "
        "(otherwise only its path is logged).",
    )

    webhook_url: str = Field(
        default="", description="Webhook of every job that names none (README: Webhooks); empty = none."
    )
    webhook_secret: str = Field(
        default="",
        description="HMAC-SHA256 key signing the webhooks of jobs that give no `webhook.secret` (at least 16 "
        "characters); empty = such jobs need their own.",
    )
    webhook_allowed_hosts: PathList = Field(
        default_factory=list,
        description="Hosts webhooks may go to besides loopback ones, comma separated.",
    )
    webhook_attempts: int = Field(
        default=8, ge=1, description="Attempts per webhook delivery before it fails."
    )
    webhook_backoff: float = Field(
        default=2.0, gt=0, description="Seconds before the second attempt; doubled after each failure."
    )
    webhook_backoff_max: float = Field(default=300.0, gt=0, description="Longest wait between two attempts.")
    webhook_timeout: float = Field(default=5.0, gt=0, description="Seconds a webhook POST may take.")

    @field_validator("artifact_root", "tensorboard_dir", "wandb_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("model_roots", "data_roots", "api_keys", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'tvkd.db'}"

    @property
    def queue_namespace(self) -> str:
        """TVKD_QUEUE_PREFIX, else one derived from the database: two deployments share a broker
        safely unless they share a database (then they are one deployment)."""
        if self.queue_prefix:
            return self.queue_prefix
        url = make_url(self.resolved_database_url).set(password=None).render_as_string(hide_password=False)
        return "tvkd-" + hashlib.sha256(url.encode()).hexdigest()[:8]

    @property
    def artifacts(self) -> Path:
        return (self.artifact_root or self.home_dir / "artifacts").expanduser().resolve()

    def tracker_settings(self, run_name: str) -> TrackerSettings:
        """Where a job's `report_to` trackers write (tvkd/trackers.py): a run named `run_name`."""
        return TrackerSettings(
            run_name=run_name,
            tensorboard_dir=str(self.tensorboard_dir or self.artifacts / "tensorboard"),
            mlflow_tracking_uri=self.mlflow_tracking_uri or str(self.home_dir / "mlruns"),
            mlflow_experiment=self.mlflow_experiment,
            wandb_project=self.wandb_project,
            wandb_mode=self.wandb_mode,
            wandb_dir=str(self.wandb_dir or self.artifacts / "wandb"),
            log_model=self.log_model,
        )

    @property
    def embedded_broker_dir(self) -> Path:
        return self.home_dir / "broker"

    @property
    def resolved_model_roots(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.model_roots] or [self.home_dir / "models"]

    @property
    def resolved_data_roots(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.data_roots] or [self.home_dir / "data"]


def get_settings() -> Settings:
    return Settings()
