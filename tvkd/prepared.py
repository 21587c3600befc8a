"""What the validate stage prepared, kept for the later stages: the pairs' split and fingerprint.

`tvkd.pipeline.validate` returns a `Prepared`; `write_prepared` stores its record in the job's
folder (`prepared.json`) and `load_prepared` rebuilds it from the data without checking,
splitting or tokenizing them again (DESIGN.md, "one job spec, validated once").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvkd.atomic import write_json_atomic
from tvkd.completions import load_completions
from tvkd.config import JobSpec
from tvkd.data import DataReport, PreferencePair, dataset_fingerprint, load_pairs

PREPARED_FILE = "prepared.json"  # what validate prepared, for the later stages (`load_prepared`)


class DatasetChanged(ValueError):
    """The dataset differs from the one the validate stage checked."""


@dataclass
class Prepared:
    """What validation found: the pairs (train then eval when an eval set is given), the split."""

    pairs: list[PreferencePair]
    train_idx: list[int]
    eval_idx: list[int]
    report: DataReport
    eval_report: DataReport | None
    dataset_fingerprint: str
    same_tokenizer: bool | None  # None without a teacher
    token_reports: dict[str, DataReport] = field(default_factory=dict)  # "student"/"teacher" → tokenizing
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """What later stages need besides the pairs themselves (`write_prepared` stores it)."""
        return {
            "version": 1,
            "dataset_fingerprint": self.dataset_fingerprint,
            "train_idx": self.train_idx,
            "eval_idx": self.eval_idx,
            "same_tokenizer": self.same_tokenizer,
            "warnings": self.warnings,
            "summary": self.summary(),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": len(self.pairs),
            "train_pairs": len(self.train_idx),
            "eval_pairs": len(self.eval_idx),
            "dataset_fingerprint": self.dataset_fingerprint,
            "same_tokenizer": self.same_tokenizer,
            "report": self.report.to_dict(),
            "eval_report": self.eval_report.to_dict() if self.eval_report else None,
            "tokenize": {k: {"kept": r.kept, "dropped": r.dropped} for k, r in self.token_reports.items()},
            "warnings": self.warnings,
        }


def issue_list(report: DataReport, limit: int = 50) -> list[dict[str, Any]]:
    return [dataclasses.asdict(i) for i in report.issues[:limit]]


def row_loader(spec: JobSpec) -> Callable[..., tuple[list[PreferencePair], DataReport]]:
    """How the job reads its rows: SFT examples (`tvkd.completions`) or preference pairs."""
    return load_completions if spec.kind == "sft" else load_pairs


def write_prepared(path: str | os.PathLike[str], prepared: Prepared) -> Path:
    """Store what validation prepared (kept-pair split, fingerprint; see `Prepared.record`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, prepared.record())
    return path


def load_prepared(spec: JobSpec, path: str | os.PathLike[str]) -> Prepared:
    """The pairs `validate` checked, without checking them again: the data are read (the pairs are
    needed) but not split, tokenized or round-tripped through templates; the split comes from
    the file `write_prepared` wrote.

    Raises DatasetChanged when the data read now differ from what validation saw (the pairs'
    fingerprint), so a job never trains on other data than were checked.
    """
    record = json.loads(Path(path).read_text())
    options, load = spec.options, row_loader(spec)
    pairs, report = load(spec.dataset, on_error=options.on_error, limit=options.limit)
    eval_report = None
    if options.eval_dataset:
        eval_pairs, eval_report = load(options.eval_dataset, on_error=options.on_error, limit=options.limit)
        pairs = pairs + eval_pairs
    fingerprint, expected = dataset_fingerprint(pairs), str(record["dataset_fingerprint"])
    if fingerprint != expected:
        raise DatasetChanged(
            f"{spec.dataset}: the dataset changed since the validate stage checked it "
            f"(fingerprint {fingerprint[:12]} != {expected[:12]}); submit a new job"
        )
    return Prepared(
        pairs=pairs,
        train_idx=[int(i) for i in record["train_idx"]],
        eval_idx=[int(i) for i in record["eval_idx"]],
        report=report,
        eval_report=eval_report,
        dataset_fingerprint=fingerprint,
        same_tokenizer=record["same_tokenizer"],
        warnings=list(record["warnings"]),
    )
