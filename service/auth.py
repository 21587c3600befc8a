"""API keys: how they are stored, made, bootstrapped, revoked and looked up.

- A key is stored as HMAC-SHA256(server secret, key) in hex (`key_hash`, unique: the look-up),
  never the key or any part of it. The row's id (`key_…`) is its non-secret name, for listings
  and revocation. A copy of the database alone gives neither a key nor a way to test guesses.
- The server secret is TVKD_SECRET_KEY, or, when that is empty, a random one generated once into
  TVKD_HOME/secret_key (mode 0600) and read from there afterwards. Placeholders ("changethis", …)
  and secrets shorter than MIN_SECRET_LENGTH are refused. Every API process of a deployment and
  `tvkd keys` must use the same secret; a new secret invalidates every stored key.
- Keys are made by `tvkd keys create` (shown once) or bootstrapped at start-up from TVKD_API_KEYS
  (`name=key` or a bare `key`, at least MIN_KEY_LENGTH characters each).
- Rows stored before migration 0002 hold sha256(key) (`hash_scheme` "sha256"). They keep working
  and are re-hashed with the secret the first time their key is used (TVKD_API_KEYS entries at
  start-up), so no unkeyed digest outlives its key's next use.
- Look-ups are cached in the process for CACHE_SECONDS: a revoked key stops working within that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.models import ApiKey, utcnow
from service.settings import Settings

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,200}$")
MIN_KEY_LENGTH = 32
MIN_SECRET_LENGTH = 32
SECRET_FILE = "secret_key"
KEY_PREFIX = "sk-tvkd-"
SCHEME_HMAC, SCHEME_SHA256 = "hmac-sha256", "sha256"
# Values copied from examples instead of chosen (the FastAPI template refuses "changethis"): a
# secret containing one of these words is refused.
PLACEHOLDERS = ("changethis", "changeme", "change-me", "change_me", "replaceme", "replace-me", "replace_me",
                "your-secret", "your_secret", "xxxxxxxx")  # fmt: skip
# A revoked key keeps working in a process for at most this long; in exchange a request costs
# no key lookup query in the common case (the latency budget of GET /v1/jobs/{id} is 20 ms p99).
CACHE_SECONDS = 10.0
CACHE_MAX = 10_000


class KeyConfigError(ValueError):
    """A key setting that cannot be used; the message names the setting, never a key."""


# --------------------------------------------------------------------------------------------
# The server secret


def check_secret(value: str, setting: str = "TVKD_SECRET_KEY") -> None:
    lowered = value.strip().lower()
    if any(p in lowered for p in PLACEHOLDERS):
        raise KeyConfigError(f"{setting} is a placeholder value: set a random one (python -c "
                             "'import secrets; print(secrets.token_urlsafe(32))'), or leave it empty "
                             "to have one generated under TVKD_HOME")  # fmt: skip
    if len(value) < MIN_SECRET_LENGTH:
        raise KeyConfigError(f"{setting} is too short: use at least {MIN_SECRET_LENGTH} random characters")


def server_secret(settings: Settings) -> bytes:
    """TVKD_SECRET_KEY, or the secret generated once under TVKD_HOME (made here when missing)."""
    if settings.secret_key:
        check_secret(settings.secret_key)
        return settings.secret_key.encode()
    path = settings.home_dir / SECRET_FILE
    if not path.exists():
        _create_secret(path)
    value = path.read_text().strip()
    if path.stat().st_mode & 0o077:
        logger.warning("%s is readable by other users: chmod 600 it", path)
    check_secret(value, setting=str(path))
    return value.encode()


def _create_secret(path: Path) -> None:
    """Write a new secret atomically: a complete file appears at once or not at all, and of two
    processes creating it at the same time one wins and both read the winner's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            logger.info("generated the server secret in %s (keep it: stored keys need it)", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Keys


def hash_key(key: str, secret: bytes) -> str:
    return hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()


def legacy_hash(key: str) -> str:
    """How keys were stored before migration 0002 (unkeyed sha256); only to find such rows."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_key_entry(entry: str) -> tuple[str, str]:
    """`name=key` or bare `key` → (name, key); a bare key is named "bootstrap". An entry splits
    at its first `=` only when the part before it is a plain name and the part after is more than
    `=` padding, so a bare base64 key ending in `==` stays a bare key."""
    entry = entry.strip()
    name, sep, key = entry.partition("=")
    if sep and key.strip("=") and NAME_RE.match(name):
        return name, key
    return "bootstrap", entry


def bootstrap_entries(entries: Iterable[str]) -> list[tuple[str, str]]:
    """The (name, key) pairs of TVKD_API_KEYS; KeyConfigError for a key that is too short."""
    out = []
    for position, entry in enumerate(e for e in entries if e.strip()):
        name, key = parse_key_entry(entry)
        if len(key) < MIN_KEY_LENGTH:
            raise KeyConfigError(
                f"TVKD_API_KEYS entry {position + 1} ({name}) is {len(key)} characters long; keys must have "
                f"at least {MIN_KEY_LENGTH} (make one with `tvkd keys create`, or python -c "
                "'import secrets; print(secrets.token_urlsafe(32))')"
            )
        out.append((name, key))
    return out


def find_key(session: Session, key: str, secret: bytes) -> ApiKey | None:
    """The row of `key` (revoked or not). A legacy sha256 row is re-hashed with the secret."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key, secret)))
    if row is not None:
        return row
    legacy = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == legacy_hash(key), ApiKey.hash_scheme == SCHEME_SHA256)
    )
    if legacy is None:
        return None
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == legacy.id, ApiKey.hash_scheme == SCHEME_SHA256)
        .values(key_hash=hash_key(key, secret), hash_scheme=SCHEME_HMAC)
        .execution_options(synchronize_session=False)
    )
    logger.info("API key %s: re-hashed from sha256 to HMAC-SHA256", legacy.id)
    session.refresh(legacy)
    return legacy


def create_key(factory: sessionmaker[Session], name: str, secret: bytes) -> tuple[ApiKey, str]:
    """A new random key: (its row, the key). The key is not stored: show it once."""
    if not NAME_RE.match(name):
        raise KeyConfigError(f"invalid key name {name!r}: use letters, digits and _.@- (at most 200)")
    key = new_key()
    with factory() as session, session.begin():
        row = ApiKey(name=name, key_hash=hash_key(key, secret), hash_scheme=SCHEME_HMAC)
        session.add(row)
    return row, key


def list_keys(factory: sessionmaker[Session], *, revoked: bool = False) -> list[ApiKey]:
    with factory() as session:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return list(session.scalars(query))


def revoke_key(factory: sessionmaker[Session], key_id: str) -> ApiKey:
    """Revoke by id; LookupError when there is no such key. Revoking twice keeps the first time."""
    with factory() as session, session.begin():
        row = session.get(ApiKey, key_id, with_for_update=True)
        if row is None:
            raise LookupError(f"no API key {key_id!r}")
        row.revoked_at = row.revoked_at or utcnow()
    return row


def bootstrap_keys(factory: sessionmaker[Session], entries: Iterable[str], secret: bytes) -> int:
    """Store the TVKD_API_KEYS keys that are not stored yet; returns how many were added.
    Idempotent, and safe when several API processes start at once (a duplicate insert loses on
    the unique hash). A revoked key stays revoked."""
    added = 0
    for name, key in bootstrap_entries(entries):
        with factory() as session:
            with session.begin():
                if find_key(session, key, secret) is not None:
                    continue
            session.add(ApiKey(name=name, key_hash=hash_key(key, secret), hash_scheme=SCHEME_HMAC))
            try:
                session.commit()
                added += 1
            except IntegrityError:
                session.rollback()  # another process stored it first
    if added:
        logger.info("bootstrapped %d API key(s) from TVKD_API_KEYS", added)
    return added


class KeyCache:
    """HMAC digest → owner id of live keys, for CACHE_SECONDS. Unknown keys are not cached, so a
    key added to the database works at once."""

    def __init__(self, secret: bytes, seconds: float = CACHE_SECONDS) -> None:
        self.secret = secret
        self.seconds = seconds
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> str | None:
        """The owner from the cache alone (no query), or None."""
        hit = self._entries.get(hash_key(key, self.secret))
        return hit[0] if hit and hit[1] > time.monotonic() else None

    def owner(self, session: Session, key: str) -> str | None:
        digest = hash_key(key, self.secret)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit and hit[1] > now:
            return hit[0]
        row = find_key(session, key, self.secret)
        owner = row.id if row is not None and row.revoked_at is None else None
        with self._lock:
            if owner is None:
                self._entries.pop(digest, None)
            else:
                if len(self._entries) >= CACHE_MAX:
                    self._entries.clear()
                self._entries[digest] = (owner, now + self.seconds)
        return owner
