"""A job's per-token samples (`samples.json`) as the API shows them: summaries for the list, and
each side in `InspectResult`'s JSON form for one sample, so the dashboard renders job samples and
POST /v1/inspect results alike.

The file is read with the library's one reader, `tvkd.artifacts.read_samples` (torch-free, so
reading a JSON file costs the API process no torch import). Parsed files are cached by path,
size and mtime, because the dashboard polls them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import models as db
from service.validation import is_inside
from tvkd.artifacts import SAMPLES_FILE, ArtifactError, Sample, SamplesFile, SampleSide, read_samples

CACHE_MAX = 16
_EMPTY_SIDE = SampleSide("", [], None, None, None)

_cache: OrderedDict[tuple[str, int, int], SamplesFile] = OrderedDict()
_lock = threading.Lock()


def samples_path(session: Session, job: db.Job, artifacts: Path) -> Path | None:
    """The job's samples file inside the artifact root, or None when there is none (yet)."""
    rel = session.scalar(
        select(db.Artifact.path).where(db.Artifact.job_id == job.id, db.Artifact.kind == "samples")
    )
    candidates = []
    if rel:
        candidates.append(artifacts / rel)
    if job.output_dir:
        candidates.append(artifacts / job.output_dir / SAMPLES_FILE)
    for path in candidates:
        if path.is_dir():
            path = path / SAMPLES_FILE
        if path.is_file() and is_inside(path, artifacts):
            return path
    return None


def load_document(path: Path) -> SamplesFile | None:
    """The samples file, or None when it cannot be read or parsed (e.g. caught mid-write on a file
    system without atomic rename, or written by a newer tvkd: treated as not there yet)."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with _lock:
            if key in _cache:
                return _cache[key]
        doc = read_samples(path)
    except (OSError, ArtifactError):
        return None
    with _lock:
        _cache[key] = doc
        while len(_cache) > CACHE_MAX:
            _cache.popitem(last=False)
    return doc


def summary(k: int, sample: Sample) -> dict[str, Any]:
    """The list view of sample `k`: per side its text, token count and sums."""

    def side(name: str) -> dict[str, Any]:
        data = sample.side(name) or _EMPTY_SIDE
        return {
            "text": data.text,
            "tokens": len(data.tokens),
            "sum_psi": data.sum_psi,
            "sum_logratio": data.sum_logratio,
            "value_end": data.value_end,
        }

    return {
        "k": k,
        "index": sample.index,
        "row": sample.row,
        "prompt": sample.prompt,
        "chosen": side("chosen"),
        "rejected": side("rejected"),
    }


def detail(doc: SamplesFile, k: int) -> dict[str, Any]:
    """Sample `k` with both sides in InspectResult's JSON form (`SamplesFile.result`)."""
    sample = doc.samples[k]
    return {
        "k": k,
        "index": sample.index,
        "row": sample.row,
        "step": doc.step,
        "chosen": doc.result(sample, "chosen").to_dict(),
        "rejected": doc.result(sample, "rejected").to_dict(),
    }
