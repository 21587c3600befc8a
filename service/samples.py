"""A job's per-token samples (`samples.json`, written by tvkd.evaluate.write_samples) as the API
shows them: summaries for the list, and each side in tvkd.inspect.InspectResult's JSON form for
one sample, so the dashboard renders job samples and POST /v1/inspect results alike.

The conversion mirrors `InspectResult.from_sample_side` instead of importing tvkd.inspect, which
imports torch: reading a JSON file must not cost the API process a second and a few hundred MB.
Parsed files are cached by path, size and mtime, because the dashboard polls them.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import models as db
from service.validation import is_inside

SAMPLES_FILE = "samples.json"
CACHE_MAX = 16

_cache: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
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


def load_document(path: Path) -> dict[str, Any] | None:
    """{"step", "loss_options", "samples": [...]} from the file (a bare list is tolerated);
    None when it cannot be read or parsed (e.g. caught mid-write on a file system without atomic
    rename: treated as not there yet)."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with _lock:
            if key in _cache:
                return _cache[key]
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, list):
        data = {"samples": data}
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        return None
    with _lock:
        _cache[key] = data
        while len(_cache) > CACHE_MAX:
            _cache.popitem(last=False)
    return data


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _prompt(sample: dict[str, Any]) -> Any:
    prompt = sample.get("prompt", "")
    return prompt if isinstance(prompt, (str, list)) else str(prompt)


def _side(sample: dict[str, Any], side: str) -> dict[str, Any]:
    data = sample.get(side)
    return data if isinstance(data, dict) else {}


def summary(k: int, sample: dict[str, Any]) -> dict[str, Any]:
    def side(name: str) -> dict[str, Any]:
        data = _side(sample, name)
        tokens = data.get("tokens")
        return {
            "text": str(data.get("text", "")),
            "tokens": len(tokens) if isinstance(tokens, list) else 0,
            "sum_psi": _num(data.get("sum_psi")),
            "sum_logratio": _num(data.get("sum_logratio")),
            "value_end": _num(data.get("value_end")),
        }

    return {
        "k": k,
        "index": _int(sample.get("index")),
        "row": _int(sample.get("row")),
        "prompt": _prompt(sample),
        "chosen": side("chosen"),
        "rejected": side("rejected"),
    }


def inspect_side(sample: dict[str, Any], side: str, method: dict[str, Any]) -> dict[str, Any]:
    """One side as InspectResult.to_dict() (see InspectResult.from_sample_side)."""
    data = _side(sample, side)
    raw_tokens = data.get("tokens")
    tokens = []
    for k, t in enumerate(raw_tokens if isinstance(raw_tokens, list) else []):
        t = t if isinstance(t, dict) else {}
        tokens.append(
            {
                "index": _int(t.get("index")) if _int(t.get("index")) is not None else k,
                "id": _int(t.get("id")) if _int(t.get("id")) is not None else -1,
                "text": str(t.get("text", "")),
                "value": _num(t.get("value")),
                "psi": _num(t.get("psi")),
                "teacher_logp": _num(t.get("teacher_logp")),
                "logratio": _num(t.get("logratio")),
            }
        )
    first_value = tokens[0]["value"] if tokens else None
    return {
        "prompt": _prompt(sample),
        "response": str(data.get("text", "")),
        "tokens": tokens,
        "sum_psi": _num(data.get("sum_psi")),
        "sum_logratio": _num(data.get("sum_logratio")),
        "value_start": _num(data.get("value_start", first_value)),
        "value_end": _num(data.get("value_end")),
        "method": method,
        "tokenization": "student",
        "side": side,
    }


def detail(doc: dict[str, Any], k: int) -> dict[str, Any]:
    sample = doc["samples"][k]
    sample = sample if isinstance(sample, dict) else {}
    method = sample.get("method") or doc.get("loss_options") or {}
    method = method if isinstance(method, dict) else {}
    return {
        "k": k,
        "index": _int(sample.get("index")),
        "row": _int(sample.get("row")),
        "step": _int(doc.get("step")),
        "chosen": inspect_side(sample, "chosen", method),
        "rejected": inspect_side(sample, "rejected", method),
    }
