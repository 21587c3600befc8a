"""Content hashes of models and tokenizers, the parts of cache keys that say "the same weights"
and "the same tokens" (the value store's key, the reference log-probs, the teacher check).

`model_fingerprint` hashes config.json and every *.safetensors file of a folder (a local one, or a
hub id's cached snapshot, never downloading), caching each file's sha256 by path, size and
mtime_ns in `$TVKD_CACHE_DIR/fingerprints.json`; `tokenizer_fingerprint` hashes what decides token
ids and prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvkd.atomic import write_json_atomic
from tvkd.models import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
FINGERPRINT_CACHE_PRUNE_AT = 512  # entries; beyond this, stale ones are dropped on save


def tvkd_cache_dir() -> Path:
    """`$TVKD_CACHE_DIR`, default ~/.cache/tvkd (fingerprint cache, downloaded wheels)."""
    env = os.environ.get("TVKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tvkd"


def _fingerprint_cache_path() -> Path:
    return tvkd_cache_dir() / "fingerprints.json"


def _load_fingerprint_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _prune_fingerprint_cache(cache: dict[str, dict[str, Any]]) -> None:
    """Drop entries for files that are gone, once the cache grows (checkpoints come and go)."""
    if len(cache) > FINGERPRINT_CACHE_PRUNE_AT:
        for key in [k for k in cache if not os.path.exists(k)]:
            del cache[key]


def _save_fingerprint_cache(path: Path, cache: dict[str, dict[str, Any]]) -> None:
    _prune_fingerprint_cache(cache)
    # Written to a temp file then renamed, so a concurrent reader never sees half a file. Two
    # writers racing can lose an entry, which only costs a re-hash later.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache, sort_keys=True)
    except OSError as exc:  # a read-only home must not break training
        logger.warning("could not write the fingerprint cache %s: %s", path, exc)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in HASH_CHUNK pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_file_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> tuple[str, bool]:
    """(sha256, whether the cache was updated). Keyed by real path, size and mtime_ns."""
    real = path.resolve()  # hub snapshots are symlinks into blobs/: key on the blob
    stat = real.stat()
    entry = cache.get(str(real))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"]), False
    sha = sha256_file(real)
    cache[str(real)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    return sha, True


def _fingerprint_folder(name_or_path: str) -> Path:
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    try:  # a hub id: fingerprint its cached snapshot by the same rule, never downloading
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as exc:  # the hub raises several unrelated types for "not cached"
        raise ModelError(
            f"cannot fingerprint {name_or_path!r}: not a local folder nor a cached hub snapshot"
        ) from exc


def model_fingerprint(name_or_path: str) -> str:
    """Stable content hash of a model: config.json and every *.safetensors file.

    The digest covers each file's name and its own sha256, so it changes with any weight or
    config change and with nothing else (not paths, not timestamps). Per-file digests are cached
    in `$TVKD_CACHE_DIR/fingerprints.json` (default ~/.cache/tvkd) keyed by path, size and
    mtime_ns, so an unchanged 500 MB model is hashed once.
    """
    folder = _fingerprint_folder(name_or_path)
    config = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not config.is_file() or not weights:
        raise ModelError(f"cannot fingerprint {folder}: it needs config.json and *.safetensors")
    cache_path = _fingerprint_cache_path()
    cache = _load_fingerprint_cache(cache_path)
    combined = hashlib.sha256(b"tvkd-model-fingerprint-v1\n")
    changed = False
    for file in [config, *weights]:
        sha, updated = _cached_file_sha256(file, cache)
        changed |= updated
        combined.update(f"{file.name}\0{sha}\n".encode())
    if changed:
        _save_fingerprint_cache(cache_path, cache)
    return combined.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides token ids and prompts: backend JSON, special tokens, template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # Padding/truncation are per-call runtime state that transformers toggles on the backend.
    backend.pop("padding", None)
    backend.pop("truncation", None)
    record = {
        "backend": backend,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "all_special_tokens": sorted(tokenizer.all_special_tokens),
        "chat_template": tokenizer.chat_template,
    }
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()
