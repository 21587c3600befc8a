"""The files a job leaves for others to read, as typed, versioned records: one writer, one reader.

- `result.json` (`ResultFile`, `write_result` / `read_result`): how a run ended, its metrics,
  where its files are, what validation, the teacher pass and training reported, and the spec.
  Written by `tvkd.run_job.run_job` (CLI and library) and by the worker's last stage.
- `samples.json` (`SamplesFile`, `write_samples_file` / `read_samples`): per-token signals of a
  few held-out pairs after training, written by `tvkd.evaluate.write_samples`, read by the CLI
  (`tvkd inspect --samples`), the API (`GET /v1/jobs/{id}/samples`) and the worker.
- `InspectResult`: per-token signals of one response, the body of `POST /v1/inspect` and the form
  in which a sample's side is shown (`SamplesFile.result`), so both render alike.

Every file carries `"version"`. Readers accept files written before versioning (no version:
version 0, the same layout; for result.json also the worker's old flat layout) and refuse a
newer version with `ArtifactError`, naming the version they know. Fields of the wrong type read as
missing (None), so samples of older jobs still render. Standard library only (no torch, no
numpy): the API and the workers import this cheaply.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tvkd.atomic import strict_json, write_json_atomic

RESULT_FILE = "result.json"
SAMPLES_FILE = "samples.json"
RESULT_VERSION = 1
SAMPLES_VERSION = 1
SIDES = ("chosen", "rejected")


class ArtifactError(ValueError):
    """A file cannot be read as the artifact it should be (the message names the file and why)."""


def _num(x: Any) -> float | None:
    """A finite number as float; anything else (missing, NaN, a string) None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _dict(x: Any) -> dict[str, Any]:
    return dict(x) if isinstance(x, Mapping) else {}


def _load(path: Path, what: str, known: int) -> tuple[Any, int]:
    """(document, version) of a JSON artifact; ArtifactError when unreadable or too new."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read {what}: {exc}") from exc
    version = _int(data.get("version")) if isinstance(data, dict) else None
    version = 0 if version is None else version
    if version > known:
        raise ArtifactError(f"{path}: {what} version {version} is newer than this tvkd reads ({known})")
    return data, version


# --------------------------------------------------------------------------------------------
# Per-token signals of one response (POST /v1/inspect, and a sample's side)


@dataclass
class TokenSignal:
    """One response token: its text, id and the signals at its state s_t (index t−1)."""

    index: int
    id: int
    text: str
    value: float | None  # V_φ(s_t)
    psi: float | None  # ψ_t (γ/terminal/shaping of the method; α not applied)
    teacher_logp: float | None  # log π_φ(y_t | s_t); None when tokenizations differ
    logratio: float | None  # β·(log π_θ − log π_ref)(y_t | s_t); None without student + reference


@dataclass
class InspectResult:
    """Per-token signals of one response and their sums.

    `tokenization` says whose tokens the rows are: the teacher's, or the student's when a student
    with a different tokenizer was given (values then mapped onto the student's boundaries as in
    MATH.md, "different tokenizers", and the teacher's per-token log-prob is not defined).
    """

    prompt: str | list[dict[str, str]]
    response: str
    tokens: list[TokenSignal]
    sum_psi: float | None
    sum_logratio: float | None
    value_start: float | None  # V_φ(s_1), the state after the prompt
    value_end: float | None  # V_φ(s_{T+1}) as the teacher computes it (also with terminal="zero")
    method: dict[str, Any] = field(default_factory=dict)
    tokenization: Literal["teacher", "student"] = "teacher"
    side: str | None = None  # "chosen"/"rejected" when built from a stored sample

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite floats become None: JSON has no NaN or infinity)."""
        return strict_json(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InspectResult:
        tokens = [TokenSignal(**t) for t in data.get("tokens", [])]
        rest = {k: v for k, v in data.items() if k != "tokens"}
        return cls(tokens=tokens, **rest)


# --------------------------------------------------------------------------------------------
# samples.json


@dataclass
class SampleToken:
    """One response token of a sample: β·log-ratio, V(s_t), ψ_t, the teacher's log-prob."""

    text: str
    id: int
    logratio: float | None
    value: float | None
    psi: float | None
    teacher_logp: float | None


@dataclass
class SampleSide:
    """One response of a sample: its text, tokens and sums; value_end = V(s_{T+1})."""

    text: str
    tokens: list[SampleToken]
    sum_psi: float | None
    sum_logratio: float | None
    value_end: float | None
    value_start: float | None = None  # V(s_1); None: the first token's value

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.value_start is None:
            del out["value_start"]
        return out

    @classmethod
    def parse(cls, data: Any) -> SampleSide:
        data = _dict(data)
        raw = data.get("tokens")
        tokens = []
        for t in raw if isinstance(raw, list) else []:
            t = _dict(t)
            token_id = _int(t.get("id"))
            tokens.append(
                SampleToken(
                    text=str(t.get("text", "")),
                    id=-1 if token_id is None else token_id,
                    logratio=_num(t.get("logratio")),
                    value=_num(t.get("value")),
                    psi=_num(t.get("psi")),
                    teacher_logp=_num(t.get("teacher_logp")),
                )
            )
        return cls(
            text=str(data.get("text", "")),
            tokens=tokens,
            sum_psi=_num(data.get("sum_psi")),
            sum_logratio=_num(data.get("sum_logratio")),
            value_end=_num(data.get("value_end")),
            value_start=_num(data.get("value_start")),
        )


@dataclass
class Sample:
    """One held-out pair: its position in the job's pairs (`index`), source row, prompt (text or
    messages) and both responses token by token (None when the file lacks a side)."""

    index: int | None
    row: int | None
    prompt: str | list[dict[str, str]]
    chosen: SampleSide | None
    rejected: SampleSide | None
    method: dict[str, Any] | None = None  # loss options of this sample, when not the file's

    def side(self, name: str) -> SampleSide | None:
        return self.chosen if name == "chosen" else self.rejected if name == "rejected" else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "row": self.row, "prompt": self.prompt}
        for name in SIDES:
            side = self.side(name)
            if side is not None:
                out[name] = side.to_dict()
        if self.method is not None:
            out["method"] = self.method
        return out

    @classmethod
    def parse(cls, data: Any) -> Sample:
        data = _dict(data)
        prompt = data.get("prompt", "")
        method = data.get("method")
        return cls(
            index=_int(data.get("index")),
            row=_int(data.get("row")),
            prompt=prompt if isinstance(prompt, str | list) else str(prompt),
            chosen=SampleSide.parse(data["chosen"]) if "chosen" in data else None,
            rejected=SampleSide.parse(data["rejected"]) if "rejected" in data else None,
            method=dict(method) if isinstance(method, Mapping) and method else None,
        )


@dataclass
class SamplesFile:
    """A job's samples.json: the samples and what the trainer recorded about them."""

    samples: list[Sample]
    step: int | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    teacher_logp_source: str | None = None  # "store" | "teacher" | None
    note: str | None = None
    version: int = SAMPLES_VERSION

    def find(self, index: int) -> Sample | None:
        """The sample of pair `index` (the "index" field, not the position in the file)."""
        return next((s for s in self.samples if s.index == index), None)

    def result(self, sample: Sample, side: str) -> InspectResult:
        """One side of `sample` as an `InspectResult` (student tokenization; the sample's loss
        options, else the file's). A missing side gives no tokens."""
        data = sample.side(side) or SampleSide("", [], None, None, None)
        tokens = [
            TokenSignal(k, t.id, t.text, t.value, t.psi, t.teacher_logp, t.logratio)
            for k, t in enumerate(data.tokens)
        ]
        first_value = tokens[0].value if tokens else None
        return InspectResult(
            prompt=sample.prompt,
            response=data.text,
            tokens=tokens,
            sum_psi=data.sum_psi,
            sum_logratio=data.sum_logratio,
            value_start=data.value_start if data.value_start is not None else first_value,
            value_end=data.value_end,
            method=dict(sample.method or self.loss_options),
            tokenization="student",
            side=side,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "step": self.step,
            "teacher_logp_source": self.teacher_logp_source,
            "note": self.note,
            "loss_options": self.loss_options,
            "samples": [s.to_dict() for s in self.samples],
        }


def write_samples_file(path: str | os.PathLike[str], doc: SamplesFile) -> Path:
    """Write samples.json atomically (non-finite numbers as null)."""
    return write_json_atomic(path, strict_json(doc.to_dict()))


def read_samples(path: str | os.PathLike[str]) -> SamplesFile:
    """Read a job's samples.json; `path` may be the file or the run folder holding it. Accepts
    version 1, the unversioned trainer document and a bare list of samples. Raises ArtifactError
    when the file cannot be read, is no samples document, or is of a newer version."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
    data, version = _load(p, "samples", SAMPLES_VERSION)
    if isinstance(data, list):
        data = {"samples": data}
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise ArtifactError(f"{p}: expected a samples document with a 'samples' list")
    source, note = data.get("teacher_logp_source"), data.get("note")
    return SamplesFile(
        samples=[Sample.parse(s) for s in data["samples"]],
        step=_int(data.get("step")),
        loss_options=_dict(data.get("loss_options")),
        teacher_logp_source=source if isinstance(source, str) else None,
        note=note if isinstance(note, str) else None,
        version=version,
    )


# --------------------------------------------------------------------------------------------
# result.json


@dataclass
class ResultPaths:
    """The run's files: absolute paths from the library and the CLI, paths relative to the
    artifact root from the service; None for what was not written."""

    output_dir: str | None = None
    model: str | None = None
    adapter: str | None = None
    checkpoint: str | None = None
    reference: str | None = None
    samples: str | None = None
    store: str | None = None  # the teacher's value store
    generations: str | None = None  # generations.json (tvkd.answers), with generation evaluation


@dataclass
class ResultFile:
    """result.json: how a run ended and what it made.

    `status` is "completed" or "stopped". The sections are what each stage reported, as dicts:
    `data` (validation: pairs, train_pairs, eval_pairs, dataset_fingerprint, same_tokenizer, ...),
    `precompute` (key, cached, seconds, tokens, ...; None without a teacher pass) and `train`
    (seconds, tokens_per_second, total_steps, resumed_from, ...; None when training did not
    run). `spec` is the job as submitted; `timings` seconds per stage. `job_id`, `parameters`
    (weights in the model folder) and `sample_count` are filled by the service.
    """

    status: str
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    paths: ResultPaths = field(default_factory=ResultPaths)
    data: dict[str, Any] | None = None
    precompute: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    parameters: int | None = None
    sample_count: int | None = None
    version: int = RESULT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {"version": out.pop("version"), **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int = RESULT_VERSION) -> ResultFile:
        if version == 0 and "paths" not in data and "job_id" in data:
            data = _legacy_service_result(data)
        known = {f for f in cls.__dataclass_fields__ if f not in ("paths", "version")}
        paths = _dict(data.get("paths"))
        return cls(
            **{k: data[k] for k in known if k in data and data[k] is not None},
            paths=ResultPaths(**{k: v for k, v in paths.items() if k in ResultPaths.__dataclass_fields__}),
            version=version,
        )


def _legacy_service_result(data: Mapping[str, Any]) -> dict[str, Any]:
    """The worker's result.json before versioning: flat paths, `validate` for `data`, and the
    job status ("succeeded") for the run's ("completed")."""
    train, pre = _dict(data.get("train")), _dict(data.get("precompute"))
    paths = {
        "model": data.get("model"),
        "samples": data.get("samples"),
        "checkpoint": train.get("checkpoint"),
        "reference": train.get("reference"),
        "adapter": train.get("adapter"),
        "store": pre.get("path"),
    }
    status = "completed" if data.get("status") == "succeeded" else data.get("status")
    rest = {k: v for k, v in data.items() if k not in ("model", "samples", "validate", "status")}
    return {**rest, "status": status, "data": data.get("validate"), "paths": paths}


def write_result(path: str | os.PathLike[str], result: ResultFile) -> Path:
    """Write result.json atomically (non-finite numbers as null, other objects as text)."""
    return write_json_atomic(path, strict_json(result.to_dict()))


def read_result(path: str | os.PathLike[str]) -> ResultFile:
    """Read result.json (`path` may be the run folder). Accepts version 1 and both unversioned
    layouts (the library's and the worker's); ArtifactError when unreadable or newer."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    data, version = _load(p, "result", RESULT_VERSION)
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise ArtifactError(f"{p}: expected a result document with a 'status'")
    try:
        return ResultFile.from_dict(data, version)
    except TypeError as exc:  # a field of an unexpected shape
        raise ArtifactError(f"{p}: not a result document: {exc}") from exc
