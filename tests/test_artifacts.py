"""The job-artifact contract (tvkd.artifacts: result.json and samples.json) and the atomic JSON
writer (tvkd.atomic): round trips, the version check, files written before versioning, and that
the contract imports neither torch nor numpy (the API reads samples with it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tvkd.artifacts import (
    RESULT_VERSION,
    SAMPLES_VERSION,
    ArtifactError,
    ResultFile,
    ResultPaths,
    Sample,
    SamplesFile,
    SampleSide,
    SampleToken,
    read_result,
    read_samples,
    write_result,
    write_samples_file,
)
from tvkd.atomic import write_json_atomic


def _side(text: str, psis: list[float]) -> SampleSide:
    tokens = [SampleToken(f"t{k}", 10 + k, 0.1 * k, 1.0 + k, psi, -2.0) for k, psi in enumerate(psis)]
    return SampleSide(text, tokens, sum_psi=sum(psis), sum_logratio=0.3, value_end=4.0)


def _samples() -> SamplesFile:
    messages = [{"role": "user", "content": "2+2?"}]
    return SamplesFile(
        samples=[
            Sample(3, 13, "Human: hi\n\nAssistant:", _side(" yes", [0.5, -0.25]), _side(" no", [1.0])),
            Sample(7, 17, messages, _side(" 4", [0.125]), _side(" 5", [-1.0, 2.0, 0.0])),
        ],
        step=12,
        loss_options={"alpha": 0.7, "beta": 0.1, "shaping": "value"},
        teacher_logp_source="store",
        note=None,
    )


def test_samples_round_trip(tmp_path: Path) -> None:
    doc = _samples()
    path = write_samples_file(tmp_path / "samples.json", doc)
    raw = json.loads(path.read_text())
    assert raw["version"] == SAMPLES_VERSION and raw["samples"][1]["prompt"][0]["role"] == "user"
    assert read_samples(tmp_path) == doc  # the run folder or the file
    assert read_samples(path).find(7).rejected.tokens[1].psi == 2.0


def test_samples_write_non_finite_as_null(tmp_path: Path) -> None:
    doc = _samples()
    doc.samples[0].chosen.tokens[0].value = math.nan
    doc.samples[0].chosen.sum_psi = math.inf
    path = write_samples_file(tmp_path / "samples.json", doc)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    back = read_samples(path).samples[0].chosen
    assert back.tokens[0].value is None and back.sum_psi is None and back.tokens[1].value == 2.0


def test_samples_reader_accepts_unversioned_files(tmp_path: Path) -> None:
    # The trainer's document before versioning (as old jobs hold it), a bare list, and a sample
    # with fields of the wrong type or missing (they read as None, never an error).
    token = {"text": "a", "id": 5, "logratio": 0.1, "value": 1.0, "psi": -0.5, "teacher_logp": None}
    side = {"text": "a", "tokens": [token, {**token, "psi": 0.25, "id": "x"}], "sum_psi": -0.25,
            "sum_logratio": 0.2, "value_end": 0.5}  # fmt: skip
    old = {"step": 7, "loss_options": {"beta": 0.1}, "samples": [{"index": 2, "row": 12, "prompt": "p",
           "chosen": side, "rejected": {"text": 3, "tokens": "none"}}]}  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    doc = read_samples(tmp_path / "old.json")
    assert doc.version == 0 and doc.step == 7 and doc.loss_options == {"beta": 0.1}
    sample = doc.samples[0]
    assert [t.psi for t in sample.chosen.tokens] == [-0.5, 0.25] and sample.chosen.tokens[1].id == -1
    assert sample.rejected.text == "3" and sample.rejected.tokens == []
    result = doc.result(sample, "chosen")
    assert result.value_start == 1.0 and result.method == {"beta": 0.1} and result.tokenization == "student"
    assert [t.index for t in result.tokens] == [0, 1]
    (tmp_path / "bare.json").write_text(json.dumps([old["samples"][0]]))
    bare = read_samples(tmp_path / "bare.json")
    assert bare.step is None and bare.samples == doc.samples


def test_samples_reader_refuses_newer_and_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "samples.json"
    path.write_text(json.dumps({"version": SAMPLES_VERSION + 1, "samples": []}))
    with pytest.raises(
        ArtifactError, match=f"version {SAMPLES_VERSION + 1} is newer.*\\({SAMPLES_VERSION}\\)"
    ):
        read_samples(path)
    path.write_text('{"samples": [')
    with pytest.raises(ArtifactError, match="cannot read samples"):
        read_samples(path)
    path.write_text(json.dumps({"step": 1}))
    with pytest.raises(ArtifactError, match="'samples' list"):
        read_samples(path)
    with pytest.raises(ArtifactError, match="cannot read"):
        read_samples(tmp_path / "missing.json")


def _result() -> ResultFile:
    return ResultFile(
        status="completed",
        steps=3,
        metrics={"loss": 0.5, "rewards/margins": 0.25},
        eval_metrics={"loss": 0.6},
        paths=ResultPaths(output_dir="/runs/a", model="/runs/a/model", samples="/runs/a/samples.json"),
        data={"pairs": 64, "train_pairs": 56, "eval_pairs": 8},
        precompute={"key": "abc", "cached": False},
        train={"seconds": 1.5, "total_steps": 3, "history": [{"step": 1, "split": "train", "loss": 0.7}]},
        timings={"validate": 0.1, "train": 1.6},
        spec={"student": "s", "train": {"batch_size": 4}},
    )


def test_result_round_trip(tmp_path: Path) -> None:
    result = _result()
    path = write_result(tmp_path / "result.json", result)
    raw = json.loads(path.read_text())
    assert next(iter(raw)) == "version" and raw["version"] == RESULT_VERSION
    assert raw["paths"]["model"] == "/runs/a/model" and raw["job_id"] is None
    assert read_result(tmp_path) == result
    result.metrics["loss"] = math.nan  # JSON has no NaN: written as null
    assert read_result(write_result(path, result)).metrics == {"loss": None, "rewards/margins": 0.25}


def test_result_reader_accepts_both_unversioned_layouts(tmp_path: Path) -> None:
    # The library's (CLI) layout before versioning: the same fields, no version.
    library = {k: v for k, v in _result().to_dict().items() if k != "version"}
    (tmp_path / "library.json").write_text(json.dumps(library))
    old = read_result(tmp_path / "library.json")
    assert old.version == 0 and old.paths.model == "/runs/a/model" and old.train["total_steps"] == 3
    # The worker's layout before versioning: flat paths, "validate", the job status.
    service = {
        "job_id": "job_1",
        "status": "succeeded",
        "model": "jobs/job_1/model",
        "samples": "jobs/job_1/samples.json",
        "sample_count": 2,
        "parameters": 1234,
        "steps": 6,
        "metrics": {"loss": 0.4},
        "eval_metrics": {},
        "validate": {"pairs": 16},
        "precompute": {"key": "k", "path": "values/k"},
        "train": {"steps": 6, "checkpoint": "jobs/job_1/checkpoints/step-000006", "adapter": None},
        "spec": {"alpha": 0.7},
    }
    (tmp_path / "service.json").write_text(json.dumps(service))
    got = read_result(tmp_path / "service.json")
    assert (got.status, got.steps, got.job_id, got.parameters, got.sample_count) == (
        "completed",
        6,
        "job_1",
        1234,
        2,
    )
    assert got.paths == ResultPaths(
        model="jobs/job_1/model",
        samples="jobs/job_1/samples.json",
        checkpoint="jobs/job_1/checkpoints/step-000006",
        store="values/k",
    )
    assert got.data == {"pairs": 16} and got.spec == {"alpha": 0.7}


def test_result_reader_refuses_newer_and_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_text(json.dumps({**_result().to_dict(), "version": RESULT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="newer than this tvkd reads"):
        read_result(path)
    path.write_text(json.dumps({"steps": 3}))
    with pytest.raises(ArtifactError, match="'status'"):
        read_result(path)
    path.write_text(json.dumps({"status": "completed", "paths": {"model": "m", "weights": "w"}}))
    assert read_result(path).paths.model == "m"  # unknown keys of a section are ignored


def test_write_json_atomic_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "doc.json", {"a": "é"})
    assert path.read_text(encoding="utf-8") == '{\n "a": "é"\n}'
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serialisable: fails half-way through
    assert json.loads(path.read_text()) == {"a": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]  # no temporary file is left
    write_json_atomic(path, {"b": 1}, sort_keys=True, fsync=True)
    assert json.loads(path.read_text()) == {"b": 1}


def test_contract_imports_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, tvkd.artifacts, tvkd.atomic, tvkd.render\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
