"""Submit-time validation of a job spec: everything that can be checked in milliseconds, so a bad
request is a 422 naming its field instead of a job that fails minutes later.

- settings: the pydantic schema (types, ranges, unknown keys), then tvkd's own dataclass checks
  (`split_settings` into TrainConfig and JobOptions), whose `ConfigError.field` becomes the
  error's field path; the result is what the job stores (`spec`) and workers load;
- models: the name resolves under TVKD_MODEL_ROOTS (`locate` refuses `..`, symlink and
  absolute-path escapes, with one answer for a path outside the roots whether it exists or not)
  or is a hub id when TVKD_ALLOW_HUB; a local folder must hold a config.json, and its config and
  tokenizer must load (cached per folder and file mtimes, so a folder is loaded once, not on
  every submit);
- dataset: a file or folder under TVKD_DATA_ROOTS (same escape rules) or the id of a dataset
  this key uploaded (hub dataset ids are not taken: the worker reads datasets under the roots).

Row-level data checks, tokenizer compatibility and the chat-template round-trip are the worker's
validate stage: they need the whole dataset and tokenizing it.

`job_spec` is what a worker calls to turn a stored job into a `JobSpec`: the same `resolve_model`
and `resolve_dataset`, with the same rules, re-checked at run time (a symlink swapped after submit
is caught; a worker may run on another host with other mounts).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service import dependencies
from service.errors import invalid
from service.models import Dataset, Job
from service.runlimits import check_model_size, check_run_size
from service.settings import Settings
from service.statemachine import Status
from tvkd.config import ConfigError, JobSpec, check_kind, split_settings, split_sft_settings
from tvkd.models import HUB_ID_RE, ModelError, load_config, load_tokenizer
from tvkd.sources import DATA_SUFFIXES  # the file types tvkd.data.load_pairs reads

logger = logging.getLogger(__name__)

DATASET_ID_RE = re.compile(r"^ds_[0-9a-f]{1,64}$")
# Files whose change invalidates a cached model check.
MODEL_CHECK_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_CHECK_CACHE_MAX = 256


@dataclass
class ValidSpec:
    """A validated job spec: its settings as the job stores them (`JobSpec.settings()`: the nested
    TrainConfig and the JobOptions, defaults filled) and the warnings to show."""

    settings: dict[str, Any]
    warnings: list[str]
    waiting: bool = False  # a model it names (`job:<id>`) is another job's that has not succeeded


# --------------------------------------------------------------------------------------------
# Settings


def config_field_path(field: str) -> str:
    return field if field in ("alpha", "beta") else f"hyperparameters.{field}"


def check_settings(
    alpha: float,
    beta: float,
    hyperparameters: dict[str, Any],
    *,
    kind: str = "tvkd",
    given: frozenset[str] = frozenset(),
) -> ValidSpec:
    """Run tvkd's dataclass checks for a job of `kind`; a ConfigError is a 422 naming `alpha`,
    `beta` or `hyperparameters.<name>`. `given` names the top-level and hyperparameter fields the
    request spelled out: a "dpo" job's alpha defaults to 0 (and must be 0); an "sft" job takes
    no alpha or beta and only the SFTConfig and job-option settings it gives (`hyperparameters`
    holds only those, so the TVKD defaults do not leak into it)."""
    try:
        if kind == "sft":
            for name in ("alpha", "beta"):
                if name in given:
                    raise ConfigError(name, "an 'sft' job has no TVKD method settings")
            train, options = split_sft_settings(hyperparameters)
            return ValidSpec(JobSpec.kind_settings("sft", train, options), [])
        if kind == "dpo":
            alpha = alpha if "alpha" in given else 0.0
        train, options = split_settings({**hyperparameters, "alpha": alpha, "beta": beta})
        check_kind(kind, train)
    except ConfigError as exc:
        raise invalid(config_field_path(exc.field), exc.message) from exc
    return ValidSpec(JobSpec.kind_settings(kind, train, options), train.method.warnings())


# --------------------------------------------------------------------------------------------
# Models


def locate(name: str, roots: Sequence[Path]) -> tuple[Path | None, bool]:
    """(the existing path inside a root that `name` names, or None; whether it names a path
    outside the roots). A relative name is tried under each root in order, an absolute one as is;
    `..` and symlinks are resolved first. Whether a name is outside the roots is decided from the
    name and the symlinks inside the roots alone, never from whether the path outside exists, so
    a caller cannot learn what exists outside the roots. Raises OSError/ValueError/RuntimeError
    for a name that is not a path (NUL, a symlink loop)."""
    raw = Path(name)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    outside = False
    for candidate in candidates:
        real = candidate.resolve()
        if not _inside(real, roots):
            outside = True
        elif real.exists():
            return real, outside
    return None, outside


def resolve_model(settings: Settings, name: str, *, field: str = "model") -> str:
    """A local model folder (resolved, inside a model root) or a hub id; 422 naming `field`. The
    messages name the model as given, never a server path."""
    if not name or not name.strip():
        raise invalid(field, "empty model name", code="invalid_model")
    roots = [r.resolve() for r in settings.resolved_model_roots]
    try:
        path, outside = locate(name, roots)
    except (OSError, ValueError, RuntimeError) as exc:  # NUL, too long a name, a symlink loop
        raise invalid(
            field, f"invalid model name {name!r} ({type(exc).__name__})", code="invalid_model"
        ) from exc
    if path is None:
        if outside:
            raise invalid(field, f"model path {name!r} is outside the model roots", code="invalid_model")
        if settings.allow_hub and HUB_ID_RE.match(name) and ".." not in name:
            return name  # a hub id: the worker's validate stage loads it
        hint = "" if settings.allow_hub else " (hub ids are not allowed here)"
        raise invalid(field, f"model {name!r} not found under the model roots{hint}", code="invalid_model")
    if not path.is_dir():
        raise invalid(field, f"{name!r} is not a model folder", code="invalid_model")
    if not (path / "config.json").is_file():
        raise invalid(field, f"{name!r} is not a model folder: it has no config.json", code="invalid_model")
    escape = escaping_entry(path, roots)
    if escape is not None:
        raise invalid(field, f"model {name!r}: {escape} (out of the model roots)", code="invalid_model")
    return str(path)


MAX_FOLDER_ENTRIES = 10_000  # a folder with more entries is refused rather than walked for long


def escaping_entry(folder: Path, roots: Sequence[Path]) -> str | None:
    """Why `folder` cannot be read inside `roots`: an entry (at any depth) that is a symlink
    resolving outside them, or more than MAX_FOLDER_ENTRIES entries to check; None when it can.
    Reading a model or dataset folder opens its files by name, so a file symlinked out of the
    roots would be read like the folder itself: it is refused the same way."""
    for count, entry in enumerate(folder.rglob("*"), start=1):
        if count > MAX_FOLDER_ENTRIES:
            return f"it holds more than {MAX_FOLDER_ENTRIES} entries"
        if entry.is_symlink() and not _inside(entry.resolve(), roots):
            return f"{str(entry.relative_to(folder))!r} is a symlink"
    return None


class ModelChecks:
    """Whether a model folder's config and tokenizer load, cached by folder and file mtimes.
    Failures are cached too (same key), so a broken folder is not reloaded on every submit."""

    def __init__(self, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = trust_remote_code
        self._results: OrderedDict[tuple[Any, ...], str | None] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @staticmethod
    def _key(folder: Path) -> tuple[Any, ...]:
        parts: list[Any] = [str(folder), folder.stat().st_mtime_ns]
        for name in MODEL_CHECK_FILES:
            try:
                st = (folder / name).stat()
                parts.append((name, st.st_mtime_ns, st.st_size))
            except OSError:
                parts.append((name, None))
        return tuple(parts)

    def problem(self, folder: Path) -> str | None:
        """None when the folder's config and tokenizer load, else why not."""
        key = self._key(folder)
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        # One load at a time: loads are rare (once per folder version) and CPU-bound, and two
        # requests for a new folder should not both pay for it.
        with self._load_lock:
            with self._lock:
                if key in self._results:
                    return self._results[key]
            result = self._load(folder)
            with self._lock:
                self._results[key] = result
                while len(self._results) > MODEL_CHECK_CACHE_MAX:
                    self._results.popitem(last=False)
        return result

    def _load(self, folder: Path) -> str | None:
        try:
            load_config(str(folder), trust_remote_code=self.trust_remote_code)
            load_tokenizer(str(folder), trust_remote_code=self.trust_remote_code)
        except ModelError as exc:
            return str(exc)
        except Exception as exc:  # transformers/tokenizers raise many types for a broken folder
            logger.info("model check of %s failed: %r", folder, exc)
            return f"cannot load the config and tokenizer of {folder.name!r}: {exc}"
        return None


def check_model(settings: Settings, checks: ModelChecks, name: str, *, field: str) -> str:
    resolved = resolve_model(settings, name, field=field)
    path = Path(resolved)
    if path.is_absolute():
        check_model_size(settings, path, field=field)  # before transformers reads the config
        problem = checks.problem(path)
        if problem:
            raise invalid(field, problem, code="invalid_model")
    # A hub id is not loaded here (that needs the network and can take long): the worker's
    # validate stage loads it.
    return resolved


# --------------------------------------------------------------------------------------------
# Datasets


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_data_path(name: str, roots: Sequence[Path], *, field: str = "dataset") -> str:
    """A dataset file or folder inside a data root (after resolving `..` and symlinks); 422 naming
    `field` otherwise, the same for a path outside the roots whether or not it exists. Hub dataset
    ids are not taken (workers read datasets under the roots only)."""
    roots = [Path(r).resolve() for r in roots]
    try:
        path, outside = locate(name, roots)
    except (OSError, ValueError, RuntimeError) as exc:
        raise invalid(
            field, f"invalid dataset path {name!r} ({type(exc).__name__})", code="invalid_dataset"
        ) from exc
    if path is None:
        if outside:
            raise invalid(
                field, f"dataset path {name!r} is outside the data roots", code="path_outside_roots"
            )
        raise invalid(field, f"dataset {name!r} not found under the data roots", code="invalid_dataset")
    escape = escaping_entry(path, roots) if path.is_dir() else None
    if escape is not None:
        raise invalid(field, f"dataset {name!r}: {escape} (out of the data roots)", code="path_outside_roots")
    if path.is_file() and not path.name.lower().endswith(DATA_SUFFIXES):
        raise invalid(
            field,
            f"{name!r} is not a dataset file (use {', '.join(DATA_SUFFIXES)}, or a folder)",
            code="invalid_dataset",
        )
    return str(path)


def resolve_dataset(
    settings: Settings, session: Session, owner_id: str, name: str, *, field: str = "dataset"
) -> str:
    """An uploaded dataset id of this key (→ its stored file), or a path under the data roots."""
    if name.startswith("ds_"):
        row = session.get(Dataset, name) if DATASET_ID_RE.match(name) else None
        if row is None or row.owner_id != owner_id:  # another key's dataset does not exist for you
            raise invalid(field, f"no uploaded dataset {name!r}", code="unknown_dataset")
        path = settings.artifacts / row.path
        if not path.is_file():
            raise invalid(field, f"the file of dataset {name!r} is gone", code="unknown_dataset")
        return str(path)
    return resolve_data_path(name, settings.resolved_data_roots, field=field)


def check_job(
    settings: Settings,
    session: Session,
    checks: ModelChecks,
    owner_id: str,
    *,
    teacher: str | None,
    student: str,
    dataset: str,
    alpha: float,
    beta: float,
    hyperparameters: dict[str, Any],
    kind: str = "tvkd",
    given: frozenset[str] = frozenset(),
) -> ValidSpec:
    """Every submit-time check, cheapest first; the first failure is raised as a 422. A model
    named `"job:<id>"` is another job's output (service.dependencies): checked as a reference;
    `ValidSpec.waiting` says whether one of them has not succeeded yet."""
    spec = check_settings(alpha, beta, hyperparameters, kind=kind, given=given)
    check_run_size(settings, spec.settings["train"])
    resolve_dataset(settings, session, owner_id, dataset)
    if hyperparameters.get("eval_dataset"):
        resolve_dataset(
            settings, session, owner_id, hyperparameters["eval_dataset"], field="hyperparameters.eval_dataset"
        )
    if kind == "tvkd" and not teacher:
        raise invalid("teacher", "a 'tvkd' job needs a teacher (or submit kind 'dpo')", code="missing_field")
    if kind != "tvkd" and teacher:
        raise invalid("teacher", f"a {kind!r} job has no teacher")
    named = [("teacher", teacher), ("student", student)]
    named += [(f"hyperparameters.{o}", hyperparameters.get(o)) for o in dependencies.REF_OPTIONS]
    for field, name in named:
        if name is None:
            continue
        if dependencies.job_ref(name) is None:
            check_model(settings, checks, name, field=field)
        elif dependencies.check_reference(session, owner_id, name, field=field).status != Status.SUCCEEDED:
            spec.waiting = True
    if hyperparameters.get("reward_model"):
        resolve_model(settings, hyperparameters["reward_model"], field="hyperparameters.reward_model")
    return spec


def _model(settings: Settings, session: Session, name: str, *, field: str) -> str:
    ref = dependencies.job_ref(name)
    if ref is None:
        return resolve_model(settings, name, field=field)
    return dependencies.model_of(settings, session, ref, field=field)


def job_spec(settings: Settings, session: Session, job: Job, *, output_dir: str, store_root: str) -> JobSpec:
    """The spec a job stored at submit, with this process's paths: every name resolved again under
    the roots (the teacher only when the method uses it; `"job:<id>"` to that job's model folder).
    Raises APIError naming the field when a name no longer resolves (a worker turns it into the
    job's error)."""
    spec = JobSpec.from_dict(
        {
            **job.spec,
            "teacher": None,
            "student": _model(settings, session, job.student, field="student"),
            "dataset": resolve_dataset(settings, session, job.owner_id, job.dataset),
            "output_dir": output_dir,
            "store_root": store_root,
            "device": settings.torch_device,
        }
    )
    if spec.uses_teacher:
        spec.teacher = _model(settings, session, job.teacher, field="teacher")
    for option in dependencies.REF_OPTIONS:  # a model named by a job option (teacher_reference)
        name = getattr(spec.options, option)
        if name:
            setattr(spec.options, option, _model(settings, session, name, field=f"hyperparameters.{option}"))
    if spec.options.eval_dataset:
        spec.options.eval_dataset = resolve_dataset(
            settings, session, job.owner_id, spec.options.eval_dataset, field="hyperparameters.eval_dataset"
        )
    if spec.options.reward_model:
        spec.options.reward_model = resolve_model(
            settings, spec.options.reward_model, field="hyperparameters.reward_model"
        )
    return spec


def is_inside(path: str | os.PathLike[str], root: Path) -> bool:
    """True when `path` (after resolving symlinks) lies inside `root`."""
    try:
        return _inside(Path(path).resolve(), [root.resolve()])
    except (OSError, ValueError, RuntimeError):
        return False


__all__ = [
    "DATA_SUFFIXES",
    "ModelChecks",
    "ValidSpec",
    "check_job",
    "check_model",
    "check_settings",
    "is_inside",
    "job_spec",
    "resolve_data_path",
    "resolve_dataset",
    "resolve_model",
]
