"""API keys: stored as sha256 hashes (a leaked database leaks no key), bootstrapped from
TVKD_API_KEYS at startup, and looked up per request with a short in-process cache.

TVKD_API_KEYS entries are `name=key` or a bare `key` (named `key-<first chars>`). An entry splits
at its first `=` only when the part before it is a plain name and the part after is more than `=`
padding, so a bare base64 key ending in `==` stays a bare key.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.models import ApiKey

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,200}$")
PREFIX_CHARS = 8
# A revoked key keeps working in a process for at most this long; in exchange a request costs
# no key lookup query in the common case (the latency budget of GET /v1/jobs/{id} is 20 ms p99).
CACHE_SECONDS = 10.0
CACHE_MAX = 10_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_key_entry(entry: str) -> tuple[str, str]:
    """`name=key` or bare `key` → (name, key)."""
    entry = entry.strip()
    name, sep, key = entry.partition("=")
    if sep and key.strip("=") and NAME_RE.match(name):
        return name, key
    return f"key-{entry[:PREFIX_CHARS]}", entry


def bootstrap_keys(factory: sessionmaker[Session], entries: Iterable[str]) -> int:
    """Insert the keys that are not stored yet; returns how many were added. Idempotent, and safe
    when several API processes start at once (a duplicate insert loses on the unique hash)."""
    added = 0
    for entry in entries:
        if not entry.strip():
            continue
        name, key = parse_key_entry(entry)
        digest = hash_key(key)
        with factory() as session:
            if session.scalar(select(ApiKey.id).where(ApiKey.key_hash == digest)) is not None:
                continue
            session.add(ApiKey(name=name, key_hash=digest, prefix=key[:PREFIX_CHARS]))
            try:
                session.commit()
                added += 1
            except IntegrityError:
                session.rollback()  # another process stored it first
    if added:
        logger.info("bootstrapped %d API key(s) from TVKD_API_KEYS", added)
    return added


class KeyCache:
    """sha256 → owner id of live keys, for CACHE_SECONDS. Unknown keys are not cached, so a key
    added to the database works at once."""

    def __init__(self, seconds: float = CACHE_SECONDS) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> str | None:
        """The owner from the cache alone (no query), or None."""
        hit = self._entries.get(hash_key(key))
        return hit[0] if hit and hit[1] > time.monotonic() else None

    def owner(self, session: Session, key: str) -> str | None:
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit and hit[1] > now:
            return hit[0]
        owner = session.scalar(
            select(ApiKey.id).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        )
        with self._lock:
            if owner is None:
                self._entries.pop(digest, None)
            else:
                if len(self._entries) >= CACHE_MAX:
                    self._entries.clear()
                self._entries[digest] = (owner, now + self.seconds)
        return owner
