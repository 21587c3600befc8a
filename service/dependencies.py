"""Jobs that build on other jobs: a job may name another job's output model as its teacher,
student or teacher reference (`hyperparameters.teacher_reference`),
`"job:<id>"`, so the paper's pipeline (teacher SFT → teacher DPO → student SFT →
distillation) is four submissions that run in order.

- At submit (`check_reference`): the named job must be one of the caller's jobs (another key's
  job, or an unknown id, is a 422 naming the field, the same answer for both) and must not have
  failed or been cancelled. A job can only name jobs that exist before it, so a chain cannot
  form a cycle (nor name itself).
- A job whose references have not all succeeded is created `waiting`: no message is sent.
- When a job reaches a terminal status (`service.jobstate.finish` settles its dependents), the
  waiting jobs that name it are settled: all their references succeeded → `validating` (the caller, or
  the reconciler's next pass, sends the validate message); one failed or was cancelled → the
  waiting job fails with code `dependency_failed`, which settles its own dependents in turn.
  The reconciler also settles every waiting job on each pass (`service.jobstate.settle_waiting`),
  for a reference that finished between a submit's check and its commit.
- At run time (`service.validation.job_spec`) a reference resolves to the folder of the named
  job's `model` artifact.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import invalid
from service.models import Artifact, Job
from service.settings import Settings
from service.statemachine import Status

REF_RE = re.compile(r"^job:(job_[0-9a-f]{1,64})$")
# The job fields that may name another job's model: Job columns, and job options of the spec
# (shown as `hyperparameters.<name>` in the API).
REF_FIELDS = ("teacher", "student")
REF_OPTIONS = ("teacher_reference",)
DEPENDENCY_FAILED = "dependency_failed"


def job_ref(name: str | None) -> str | None:
    """The job id that `name` refers to (`"job:<id>"`), else None (`name` is a model name)."""
    if not name or not name.startswith("job:"):
        return None
    m = REF_RE.match(name)
    return m.group(1) if m else ""  # "" = malformed: `check_reference` refuses it


def references(job: Job) -> dict[str, str]:
    """{field: job id} of the jobs `job` names."""
    out = {}
    for name in REF_FIELDS:
        ref = job_ref(getattr(job, name))
        if ref:
            out[name] = ref
    options = (job.spec or {}).get("options") or {}
    for name in REF_OPTIONS:
        ref = job_ref(options.get(name))
        if ref:
            out[name] = ref
    return out


def check_reference(session: Session, owner_id: str, name: str, *, field: str) -> Job:
    """The caller's job that `name` ("job:<id>") names; 422 naming `field` when it is malformed,
    unknown, another key's, failed or cancelled."""
    ref = job_ref(name)
    if not ref:
        raise invalid(field, f"{name!r} is not a job reference (job:<id>)", code="unknown_job")
    job = session.get(Job, ref)
    if job is None or job.owner_id != owner_id:
        raise invalid(field, f"no job {ref!r} to take the model of", code="unknown_job")
    if job.status in (Status.FAILED, Status.CANCELLED):
        raise invalid(field, f"job {ref} {job.status}: it will make no model", code=DEPENDENCY_FAILED)
    return job


def model_of(settings: Settings, session: Session, job_id: str, *, field: str) -> str:
    """The model folder a succeeded job made (absolute); 422 naming `field` otherwise."""
    job = session.get(Job, job_id)
    if job is None or job.status != Status.SUCCEEDED:
        status = "unknown" if job is None else job.status
        raise invalid(field, f"job {job_id} has not succeeded (it is {status})", code=DEPENDENCY_FAILED)
    path = session.scalar(select(Artifact.path).where(Artifact.job_id == job_id, Artifact.kind == "model"))
    if path is None or not (settings.artifacts / path / "config.json").is_file():
        raise invalid(field, f"the model folder of job {job_id} is gone", code="invalid_model")
    return str(settings.artifacts / path)


def verdict(session: Session, job: Job) -> tuple[str, str] | None:
    """("release", "") when every job `job` names succeeded; ("fail", why) when one failed, was
    cancelled or is gone; None while one is still on its way."""
    pending = False
    for field, ref in references(job).items():
        other = session.get(Job, ref)
        if other is None or other.status in (Status.FAILED, Status.CANCELLED):
            what = "is gone" if other is None else other.status
            return "fail", f"the {field} job {ref} {what}: this job cannot run"
        pending |= other.status != Status.SUCCEEDED
    return None if pending else ("release", "")


def dependents(session: Session, job: Job) -> list[Job]:
    """The waiting jobs (of the same key) that name `job`, locked for update."""
    rows = session.scalars(
        select(Job)
        .where(Job.status == Status.WAITING, Job.owner_id == job.owner_id)
        .order_by(Job.created_at, Job.id)
        .with_for_update()
    ).all()
    return [j for j in rows if job.id in references(j).values()]
