"""/v1/models: the model folders a job may name, found under TVKD_MODEL_ROOTS.

A model is a folder holding a config.json, up to MAX_DEPTH levels below a root (not descending
into a model folder, into hidden folders, or through symlinks that leave the roots). Its id is
its path relative to the root: exactly what a job's `teacher`/`student` takes. Facts are read
from config.json, the tokenizer config and the safetensors headers only, and cached per folder
and config mtime.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query

from service.deps import OwnerDep, SettingsDep
from service.errors import invalid
from service.pagination import DEFAULT_LIMIT, LimitQuery, Page
from service.schemas import ModelInfo, ModelList, error_responses
from tvkd.models import ModelError, safetensors_param_count

router = APIRouter(prefix="/v1/models", tags=["models"])

MAX_DEPTH = 3
_facts: dict[tuple[str, int], dict[str, Any]] = {}
_lock = threading.Lock()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_facts(folder: Path) -> dict[str, Any]:
    """Architecture, parameter count and chat template of one model folder (cached)."""
    key = (str(folder), (folder / "config.json").stat().st_mtime_ns)
    with _lock:
        if key in _facts:
            return _facts[key]
    config = _read_json(folder / "config.json")
    archs = config.get("architectures")
    try:
        params: int | None = safetensors_param_count(folder)
    except (ModelError, OSError, ValueError, KeyError):
        params = None
    tok_config = _read_json(folder / "tokenizer_config.json")
    has_template = bool(tok_config.get("chat_template")) or any(
        (folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")
    )
    facts = {
        "architecture": archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None,
        "model_type": config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        "params": params,
        "has_chat_template": has_template,
    }
    with _lock:
        _facts[key] = facts
    return facts


def find_models(roots: list[Path]) -> list[tuple[str, Path, Path]]:
    """(id, root, folder) of every model folder under the roots, sorted by id (first root wins)."""
    found: dict[str, tuple[str, Path, Path]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            depth = len(here.relative_to(root).parts)
            if "config.json" in filenames and here != root:
                real = here.resolve()
                if any(real == r or real.is_relative_to(r) for r in roots):
                    name = here.relative_to(root).as_posix()
                    found.setdefault(name, (name, root, here))
                dirnames[:] = []  # a model folder's subfolders (checkpoints, …) are not listed
                continue
            # Follow symlinked folders only while they stay inside the roots.
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".")
                and depth < MAX_DEPTH
                and any((here / d).resolve().is_relative_to(r) for r in roots)
            )
    return [found[k] for k in sorted(found)]


@router.get(
    "",
    response_model=ModelList,
    summary="Model folders under the model roots",
    responses=error_responses(401, 422),
)
def list_models(
    settings: SettingsDep,
    _owner: OwnerDep,
    after: Annotated[
        str | None, Query(max_length=1024, description="The last model id of the previous page.")
    ] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ModelList:
    roots = settings.resolved_model_roots
    models = find_models(roots)
    if after is not None:
        ids = [m[0] for m in models]
        if after not in ids:
            raise invalid("after", f"no model {after!r} to page after", code="invalid_cursor")
        models = models[ids.index(after) + 1 :]
    page = Page.of(models[: limit + 1], limit)
    data = []
    for name, root, folder in page.rows:
        try:
            facts = model_facts(folder)
        except OSError:  # removed while listing
            continue
        data.append(ModelInfo(id=name, root=f"model_roots[{roots.index(root)}]", **facts))
    return ModelList(data=data, has_more=page.has_more, next_after=page.next_after(lambda m: m[0]))
