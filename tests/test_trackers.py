"""Experiment trackers (tvkd/trackers.py), read back with the trackers' own libraries, offline:
TensorBoard event files (tensorboard's EventAccumulator), an MLflow file store (MlflowClient: the
run, its params, metric histories and tags) and a W&B offline run folder (its transaction log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb_log import config as wandb_config
from wandb_log import history as wandb_history
from wandb_log import summary as wandb_summary

from tvkd.artifacts import read_result
from tvkd.trackers import TrackerSettings, open_trackers


def _mlflow_client(uri: str):
    from mlflow import MlflowClient

    from tvkd.trackers import _mlflow_uri

    return MlflowClient(tracking_uri=_mlflow_uri(uri))


def _mlflow_runs(uri: str, experiment: str = "tvkd"):
    client = _mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client, client.search_runs([exp.experiment_id])


def _tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _wandb_log(root: Path, run_id: str) -> Path:
    (log,) = root.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    return log


def test_cli_train_reports_to_tensorboard_mlflow_and_wandb(train_models, arith_data, tmp_path, monkeypatch):
    from tvkd.cli import main

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_DIR", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run-a"
    argv = [
        "train",
        "--student", train_models["student"],
        "--data", arith_data,
        "--output", str(out),
        "--device", "cpu",
        "--alpha", "0",
        "--batch-size", "4",
        "--max-steps", "3",
        "--eval-every", "2",
        "--max-length", "64",
        "--eval-fraction", "0.125",
        "--num-samples", "0",
        "--learning-rate", "1e-3",
        "--report-to", "tensorboard", "mlflow", "wandb",
    ]  # fmt: skip
    assert main(argv) == 0
    record = read_result(out / "result.json")
    history = record.train["history"]
    train = {h["step"]: h for h in history if h["split"] == "train"}
    evals = {h["step"]: h for h in history if h["split"] == "eval"}
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [2, 3]
    names = [k for k in train[1] if k not in ("step", "split")]
    assert {"loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr"} <= set(names)
    model_dir = str(out / "model")

    # TensorBoard: out/runs/<run name>, transformers' names (train/…, eval/…), every step.
    tb = _tensorboard(out / "runs" / "run-a")
    for name in names:
        points = tb.Scalars(f"train/{name}")
        assert [p.step for p in points] == [1, 2, 3], name
        assert [p.value for p in points] == pytest.approx([train[s][name] for s in (1, 2, 3)], rel=1e-6)
    assert [(p.step, p.value) for p in tb.Scalars("eval/loss")] == [
        (s, pytest.approx(evals[s]["loss"], rel=1e-6)) for s in (2, 3)
    ]
    texts = {tag: tb.Tensors(tag) for tag in tb.Tags()["tensors"]}
    config_text = texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.001' in config_text and '"report_to"' in config_text
    assert texts["model_dir/text_summary"][0].tensor_proto.string_val[0].decode() == model_dir

    # MLflow: a file store in out/mlruns, experiment "tvkd", one finished run named after the output.
    client, runs = _mlflow_runs(str(out / "mlruns"))
    (run,) = runs
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["alpha"] == "0.0" and params["learning_rate"] == "0.001" and params["batch_size"] == "4"
    assert json.loads(params["report_to"]) == ["tensorboard", "mlflow", "wandb"]
    assert run.data.tags["model_dir"] == model_dir
    for name in names:
        steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == [(s, pytest.approx(train[s][name], rel=1e-6)) for s in (1, 2, 3)], name
    eval_loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss")]
    assert eval_loss == [(s, pytest.approx(evals[s]["loss"], rel=1e-6)) for s in (2, 3)]

    # W&B: an offline run folder under out/wandb with the run name as its id.
    log = _wandb_log(out, "run-a")
    rows = {r["_step"]: r for r in wandb_history(log)}
    assert sorted(rows) == [1, 2, 3]
    for step in (1, 2, 3):
        for name in names:
            assert rows[step][f"train/{name}"] == pytest.approx(train[step][name], rel=1e-6), (step, name)
    assert rows[2]["eval/loss"] == pytest.approx(evals[2]["loss"], rel=1e-6)
    assert rows[3]["eval/rewards/accuracies"] == pytest.approx(evals[3]["rewards/accuracies"], rel=1e-6)
    cfg = wandb_config(log)
    assert cfg["learning_rate"] == 1e-3 and cfg["alpha"] == 0.0 and cfg["run_name"] == "run-a"
    assert wandb_summary(log)["model_dir"] == model_dir


def _drive(settings: TrackerSettings, report_to: list[str], steps: range, *, model_dir: str | None = None):
    """Report `loss = 1/step` at each step, as a job would, then close with `model_dir`."""
    tracker = open_trackers(report_to, settings, {"alpha": 0.5, "batch_size": 8})
    assert tracker is not None
    tracker.on_stage("train", {"start_step": steps.start - 1})
    for step in steps:
        tracker.on_metrics(step, {"loss": 1.0 / step}, "train")
    tracker.close(model_dir, "completed" if model_dir else "stopped")


def test_a_resumed_job_continues_its_runs(tmp_path):
    """Steps 1-3, a stop, then steps 3-5 again (a resume from the step-2 checkpoint): one MLflow
    run; TensorBoard purges the first attempt's step 3 and keeps each step once."""
    settings = TrackerSettings(
        run_name="job-1", tensorboard_dir=str(tmp_path / "tb"), mlflow_tracking_uri=str(tmp_path / "ml")
    )
    _drive(settings, ["tensorboard", "mlflow"], range(1, 4))
    client, runs = _mlflow_runs(settings.mlflow_tracking_uri)
    assert [r.info.status for r in runs] == ["KILLED"]
    _drive(settings, ["tensorboard", "mlflow"], range(3, 6), model_dir=str(tmp_path / "model"))
    client, runs = _mlflow_runs(settings.mlflow_tracking_uri)
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["model_dir"] == str(tmp_path / "model")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5]
    tb = _tensorboard(tmp_path / "tb" / "job-1")
    assert [(p.step, p.value) for p in tb.Scalars("train/loss")] == [
        (s, pytest.approx(1.0 / s)) for s in range(1, 6)
    ]


def test_log_model_uploads_the_folder_to_mlflow(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    settings = TrackerSettings(
        run_name="job-2",
        tensorboard_dir=str(tmp_path / "tb"),
        mlflow_tracking_uri=str(tmp_path / "ml"),
        log_model=True,
    )
    _drive(settings, ["mlflow"], range(1, 3), model_dir=str(model))
    client, (run,) = _mlflow_runs(settings.mlflow_tracking_uri)
    files = {Path(f.path).name: f.file_size for f in client.list_artifacts(run.info.run_id, "model")}
    assert files == {"config.json": 23, "model.safetensors": 64}


def test_only_rank_zero_reports(tmp_path, monkeypatch):
    settings = TrackerSettings(
        run_name="r", tensorboard_dir=str(tmp_path / "tb"), mlflow_tracking_uri=str(tmp_path / "ml")
    )
    monkeypatch.setenv("RANK", "1")
    assert open_trackers(["tensorboard", "mlflow"], settings, {}) is None
    monkeypatch.setenv("RANK", "0")
    assert open_trackers(["tensorboard"], settings, {}) is not None
    assert open_trackers([], settings, {}) is None


def test_report_to_is_checked_by_name():
    from tvkd.config import ConfigError, JobOptions, split_settings

    assert split_settings({"report_to": ["mlflow"]})[1].report_to == ["mlflow"]
    for bad in (["neptune"], "wandb", ["wandb", "wandb"]):
        with pytest.raises(ConfigError) as info:
            JobOptions(report_to=bad)
        assert info.value.field == "report_to"


def test_an_mlflow_file_store_under_an_artifacts_folder_is_refused(tmp_path):
    """MLflow's file store finds no run through a folder named 'artifacts' ("Run … not found" after
    creating it): refused up front, naming the setting."""
    from tvkd.config import ConfigError

    settings = TrackerSettings(
        run_name="r",
        tensorboard_dir=str(tmp_path),
        mlflow_tracking_uri=str(tmp_path / "artifacts" / "mlruns"),
    )
    with pytest.raises(ConfigError, match="inside a folder named 'artifacts'") as info:
        open_trackers(["mlflow"], settings, {})
    assert info.value.field == "report_to"
