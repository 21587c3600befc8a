"""A stage's failure as the job shows it: `classify` gives the error code of an exception, and
the two ways a train stage under torchrun (worker/torchrun.py) ends badly: `RankFailed` (a rank's
own error: the job fails as in one process) and `RankCrashed` (a rank died: the attempt fails,
the job resumes from its last checkpoint)."""

from __future__ import annotations

from tvkd.config import ConfigError
from tvkd.data import DataError
from tvkd.models import ModelError
from tvkd.numerics import NonFiniteError
from tvkd.prepared import DatasetChanged
from worker.context import DatasetNotFound
from worker.oom import is_out_of_memory


class RankFailed(RuntimeError):
    """A rank raised an error of the job's own; `code` is its error code (`classify`, in the rank)."""

    def __init__(self, code: str, message: str, rank: int, traceback: list[str]) -> None:
        super().__init__(message)
        self.code, self.rank, self.traceback = code, rank, traceback


class RankCrashed(RuntimeError):
    """A rank died (a signal, a peer's crash): the attempt failed; the job resumes from its last
    checkpoint."""


def classify(exc: BaseException, stage: str) -> str:
    """The job's error code for an exception in `stage`."""
    if isinstance(exc, RankFailed):  # a rank's own error, classified there
        return exc.code
    if is_out_of_memory(exc):
        return "out_of_memory"
    if isinstance(exc, NonFiniteError):
        return exc.code
    if isinstance(exc, ModelError):
        return "model_error"
    if isinstance(exc, ConfigError):
        return "validation_error"
    if isinstance(exc, DataError | DatasetNotFound | DatasetChanged):
        return "validation_error" if stage == "validate" else "data_error"
    from tvkd.teacher import UnsupportedTeacher

    if isinstance(exc, UnsupportedTeacher):
        return "model_error"
    if stage == "validate" and isinstance(exc, ValueError | OSError):
        return "validation_error"
    return "internal_error"
