"""What the API may show of server-side text: job errors and events (written by the workers),
stage results, value-store fields, validation messages. These are made from exceptions and file
names and can hold what a client must not see; everything the API serves from them goes through
`Redactor` first:

- absolute paths: inside a root (artifact, model, data roots, TVKD_HOME) they become the name
  relative to that root (`teacher/config.json`, `jobs/job_…/model`; the root itself `<model
  root>`); any other absolute path becomes `…/<its last part>`;
- Python tracebacks: a `traceback` entry of event data is dropped, and a traceback inside a text
  is cut down to its last line (the exception);
- SQL: a database driver's message (SQLAlchemy's `[SQL: …]` blocks, psycopg's) is replaced by
  "a database error (details in the server log)";
- another key's job ids (`computed_by` of a shared value store): `foreign_job_ids` finds the ids
  a text mentions that the caller does not own, and `scrub` hides them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.settings import Settings

JOB_ID_RE = re.compile(r"\bjob_[0-9a-f]{24}\b")
# An absolute POSIX path: a `/` that starts a token (not inside a URL, a relative path or a word),
# up to whitespace, a quote, a bracket or a separator.
PATH_RE = re.compile(r"(?<![\w.:/~\-%])/[^\s'\"`()\[\]{}<>,;|]+")  # a lone "/" is no path
TRACEBACK_HEAD = "Traceback (most recent call last)"
SQL_MARKERS = ("[SQL:", "sqlalche.me/e/", "(psycopg.", "(sqlite3.", "psycopg.errors.")
DATABASE_ERROR = "a database error (details in the server log)"
ANOTHER_JOB = "another key's job"
DROPPED_KEYS = frozenset({"traceback"})


class Redactor:
    """Rewrites server-side text for clients. `roots` are (root, label) pairs; a path is shown
    relative to the longest root holding it."""

    def __init__(self, roots: Sequence[tuple[Path, str]]) -> None:
        pairs: dict[str, str] = {}
        for root, label in roots:
            for form in {str(root), str(Path(root).resolve())}:
                pairs.setdefault(form.rstrip("/") or "/", label)
        self._roots = sorted(pairs.items(), key=lambda p: -len(p[0]))

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        roots: list[tuple[Path, str]] = [(settings.artifacts, "<artifact root>")]
        roots += [(r, "<model root>") for r in settings.resolved_model_roots]
        roots += [(r, "<data root>") for r in settings.resolved_data_roots]
        roots.append((settings.home_dir, "<TVKD_HOME>"))
        return cls(roots)

    def path(self, match: re.Match[str]) -> str:
        path = match.group(0)
        trail = ""
        while path and path[-1] in ".:!?":  # sentence punctuation after a path
            path, trail = path[:-1], path[-1] + trail
        for root, label in self._roots:
            if path == root:
                return label + trail
            if path.startswith(root + "/"):
                return (path[len(root) + 1 :] or label) + trail
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return (f"…/{name}" if name else "…") + trail

    def text(self, value: str) -> str:
        if any(marker in value for marker in SQL_MARKERS):
            return DATABASE_ERROR
        if TRACEBACK_HEAD in value:
            lines = [line for line in value.splitlines() if line.strip()]
            head = value.split(TRACEBACK_HEAD, 1)[0].rstrip(" :\n")
            value = "; ".join(x for x in (head, lines[-1].strip() if lines else "") if x)
        return PATH_RE.sub(self.path, value)

    def value(self, obj: Any, hide: frozenset[str] = frozenset()) -> Any:
        """`obj` (JSON-like) with every string rewritten, `traceback` entries dropped, and the job
        ids in `hide` replaced (an id that is a whole value becomes None)."""
        if isinstance(obj, str):
            if obj in hide:
                return None
            out = self.text(obj)
            if not hide:
                return out
            return JOB_ID_RE.sub(lambda m: ANOTHER_JOB if m.group(0) in hide else m.group(0), out)
        if isinstance(obj, dict):
            return {k: self.value(v, hide) for k, v in obj.items() if k not in DROPPED_KEYS}
        if isinstance(obj, list | tuple):
            return [self.value(v, hide) for v in obj]
        return obj

    def scrubber(self, session: Session, owner: str, objs: Iterable[Any], own: Iterable[str] = ()) -> Scrub:
        """A `Scrub` for what `owner` may see of `objs`: hides the job ids they mention that are
        not the caller's (one query, none when they mention only ids in `own`)."""
        return Scrub(self, foreign_job_ids(session, owner, objs, own))


class Scrub:
    """Redactor.value with a fixed set of job ids to hide; `text` always returns a string."""

    def __init__(self, redactor: Redactor, hide: frozenset[str] = frozenset()) -> None:
        self.redactor, self.hide = redactor, hide

    def __call__(self, obj: Any) -> Any:
        return self.redactor.value(obj, self.hide)

    def text(self, value: str) -> str:
        out = self(value)
        return out if isinstance(out, str) else ANOTHER_JOB


def mentioned_job_ids(objs: Iterable[Any]) -> set[str]:
    found: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, str):
            found.update(JOB_ID_RE.findall(obj))
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    for obj in objs:
        walk(obj)
    return found


def foreign_job_ids(
    session: Session, owner: str, objs: Iterable[Any], own: Iterable[str] = ()
) -> frozenset[str]:
    """The job ids mentioned in `objs` that `owner` does not own."""
    from service.models import Job

    ids = mentioned_job_ids(objs) - set(own)
    if not ids:
        return frozenset()
    mine = set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.owner_id == owner)))
    return frozenset(ids - mine)
