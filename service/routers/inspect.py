"""/v1/inspect: the teacher's per-token values V(s_t) and shaping ψ_t for any prompt/response.

The teacher (and, for `q_source="implicit"`, its reference) is loaded once per API process and
kept (the last TEACHERS_KEPT folders, keyed by folder and file mtimes, so a replaced model is
reloaded). Inference runs in the threadpool under
a lock: one forward at a time, since concurrent CPU forwards only fight over the same cores.
Requests queue for it in the event loop (one inference at a time), not in the threadpool. torch and
transformers are imported on the first call, not at API start.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from service.deps import OwnerDep, SettingsDep
from service.errors import APIError, invalid
from service.schemas import InspectRequest, InspectResponse, error_responses
from service.settings import Settings
from service.validation import config_field_path, resolve_model
from tvkd.config import ConfigError, MethodConfig

router = APIRouter(prefix="/v1/inspect", tags=["inspect"])

TEACHERS_KEPT = 2  # a teacher and its reference (q_source="implicit")


class TeacherCache:
    def __init__(self) -> None:
        self._models: OrderedDict[tuple[Any, ...], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()  # guards loading and the forward passes

    @staticmethod
    def _key(resolved: str) -> tuple[Any, ...]:
        folder = Path(resolved)
        if not folder.is_absolute():
            return (resolved,)
        files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors"))
        return (resolved, *((p.name, p.stat().st_mtime_ns) for p in files))

    def _get(self, settings: Settings, resolved: str, field: str) -> tuple[Any, Any]:
        from tvkd.models import ModelError, load_causal_lm, load_tokenizer

        key = self._key(resolved)
        if key not in self._models:
            try:
                tokenizer = load_tokenizer(resolved, trust_remote_code=settings.trust_remote_code)
                model = load_causal_lm(resolved, trust_remote_code=settings.trust_remote_code)
            except ModelError as exc:
                raise invalid(field, str(exc), code="invalid_model") from exc
            except Exception as exc:  # a damaged folder: safetensors, torch and transformers errors
                message = f"cannot load the {field.replace('_', ' ')}'s weights ({type(exc).__name__}: {exc})"
                raise invalid(field, message, code="invalid_model") from exc
            self._models[key] = (model, tokenizer)
            while len(self._models) > TEACHERS_KEPT:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return self._models[key]

    def run(self, settings: Settings, resolved: str, fn: Any, reference: str | None = None) -> Any:
        """fn(model, tokenizer, reference_model or None) under the lock, the models loaded once."""
        from tvkd.fingerprints import tokenizer_fingerprint

        with self._lock:
            ref_model = None
            if reference is not None:
                ref_model, ref_tokenizer = self._get(settings, reference, "teacher_reference")
            model, tokenizer = self._get(settings, resolved, "teacher")
            if reference is not None and tokenizer_fingerprint(ref_tokenizer) != tokenizer_fingerprint(
                tokenizer
            ):
                raise invalid(
                    "teacher_reference", "it does not have the teacher's tokenizer", code="invalid_model"
                )
            return fn(model, tokenizer, ref_model)


_teachers = TeacherCache()


# Requests wait for the model here, in the event loop, rather than each holding one of the
# threadpool's threads while blocked on TeacherCache's lock: a burst of inspections must not
# starve every other endpoint of threads.
_gate = asyncio.Semaphore(1)


@router.post(
    "",
    response_model=InspectResponse,
    summary="Per-token teacher values and shaping of one response",
    responses=error_responses(401, 422),
)
async def inspect(body: InspectRequest, settings: SettingsDep, _owner: OwnerDep) -> InspectResponse:
    async with _gate:
        return await run_in_threadpool(_inspect, body, settings)


def _inspect(body: InspectRequest, settings: Settings) -> InspectResponse:
    from tvkd.data import RowError
    from tvkd.inspect import inspect_response

    try:
        method = MethodConfig(
            alpha=body.alpha,
            beta=body.beta,
            value_beta=body.value_beta,
            gamma=body.gamma,
            terminal=body.terminal,
            q_source=body.q_source,
            shaping=body.shaping,
        )
    except ConfigError as exc:
        raise invalid(config_field_path(exc.field).removeprefix("hyperparameters."), exc.message) from exc
    reference = None
    if method.q_source == "implicit":
        if not body.teacher_reference:
            raise invalid("teacher_reference", "q_source='implicit' needs the teacher's reference model")
        reference = resolve_model(settings, body.teacher_reference, field="teacher_reference")
    resolved = resolve_model(settings, body.teacher, field="teacher")
    prompt: Any = body.prompt if isinstance(body.prompt, str) else [m.model_dump() for m in body.prompt]

    def run(model: Any, tokenizer: Any, reference_model: Any) -> dict[str, Any]:
        return inspect_response(
            model,
            tokenizer,
            prompt,
            body.response,
            method=method,
            max_length=body.max_length,
            teacher_reference_model=reference_model,
        ).to_dict()

    try:
        result = _teachers.run(settings, resolved, run, reference=reference)
    except RowError as exc:
        issue = exc.issue
        field = "response" if issue.field in ("chosen", "rejected", "response") else "prompt"
        raise APIError(422, issue.code, issue.message, field=field) from exc
    except ValueError as exc:  # e.g. a shaping mode the teacher's tokens cannot give
        raise invalid("prompt", str(exc)) from exc
    return InspectResponse.model_validate(result)
