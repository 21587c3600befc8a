"""Model and tokenizer folders: resolving, loading and fingerprinting them.

Everything TVKD trains or reads is a plain Hugging Face causal-LM folder holding safetensors
weights. This module is the one place that reads those folders:

- `resolve_model_path` keeps job-supplied names inside the configured model roots;
- `load_tokenizer` / `load_config` / `load_causal_lm` load them with the project's rules
  (fast tokenizer, safetensors only, eval mode, SDPA attention where the model supports it);
- their content hashes for cache keys (`model_fingerprint`, `tokenizer_fingerprint`) are
  `tvkd.fingerprints`.

Making model folders (a tiny test model, the SmolLM2 teacher, a student cut from a teacher's
layers) is `tvkd.model_prep`, used by the CLI, the demo and the tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers are imported lazily: they cost seconds to import.
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCE_FILE",
    "ModelError",
    "check_safetensors_folder",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "read_source",
    "resolve_model_path",
    "safetensors_param_count",
    "write_source",
]

# Names that lived here before model building moved to tvkd.model_prep. Scripts written against the
# old layout (the field cases of ../shared/cases/field import them) keep working, with a warning.
_MOVED_TO_MODEL_PREP = frozenset(
    {"TINY_SPECIAL_TOKENS", "TINY_CHAT_TEMPLATE", "_builtin_corpus", "build_tiny_model", "derive_student"}
)


def __getattr__(name: str) -> Any:
    """Resolve a name that moved to `tvkd.model_prep`, warning (DeprecationWarning) where it lives now.

    Raises AttributeError for any other missing name, as a module does."""
    if name in _MOVED_TO_MODEL_PREP:
        import importlib
        import warnings

        warnings.warn(
            f"tvkd.models.{name} moved to tvkd.model_prep.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("tvkd.model_prep"), name)
    raise AttributeError(f"module 'tvkd.models' has no attribute {name!r}")


SOURCE_FILE = "tvkd_source.json"
"""Provenance file written into every folder `tvkd.model_prep` creates."""

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelError(ValueError):
    """A model folder or name is unusable; the message says what to do about it."""


# --------------------------------------------------------------------------------------------
# Resolving names under roots


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_model_path(
    name_or_path: str,
    *,
    roots: Sequence[str | Path] | None = None,
    allow_hub: bool = False,
) -> str:
    """Turn a job-supplied model name into a local path (or a hub id), refusing escapes.

    With `roots`, a relative name is looked up under each root in order and an absolute path must
    lie inside one of them; both are checked after resolving symlinks and `..`, so neither a
    `../` nor a symlink can reach outside the roots. Without `roots`, any existing path is fine.
    A name that does not exist locally is returned unchanged as a hub id only when `allow_hub`.
    """
    if not name_or_path or not name_or_path.strip():
        raise ModelError("empty model name")
    raw = Path(name_or_path).expanduser()
    if roots is None:
        if raw.exists():
            return str(raw.resolve())
        return _hub_or_missing(name_or_path, allow_hub, "no such file or directory")

    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    if not resolved_roots:
        raise ModelError("no model roots are configured (set TVKD_MODEL_ROOTS)")
    candidates = [raw] if raw.is_absolute() else [root / raw for root in resolved_roots]
    escaped: Path | None = None
    for candidate in candidates:
        if not candidate.exists():
            continue
        real = candidate.resolve()
        if any(_inside(real, root) for root in resolved_roots):
            return str(real)
        escaped = real
    if escaped is not None:
        raise ModelError(
            f"model path {name_or_path!r} resolves to {escaped}, outside the allowed model roots "
            f"({', '.join(map(str, resolved_roots))})"
        )
    if raw.is_absolute():
        raise ModelError(
            f"model path {name_or_path!r} does not exist or is not under the model roots "
            f"({', '.join(map(str, resolved_roots))})"
        )
    where = f"not found under roots {', '.join(map(str, resolved_roots))}"
    return _hub_or_missing(name_or_path, allow_hub, where)


def _hub_or_missing(name: str, allow_hub: bool, where: str) -> str:
    # Only a well-formed "org/name" may go to the hub: never anything path-like.
    if allow_hub and HUB_ID_RE.match(name) and ".." not in name:
        return name
    hint = "" if allow_hub else " (hub ids are not allowed here)"
    raise ModelError(f"model {name!r}: {where}{hint}")


# --------------------------------------------------------------------------------------------
# Loading


def _local_dir(name_or_path: str | Path) -> Path | None:
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def _require_local_if_pathlike(name_or_path: str | Path) -> None:
    """Fail early, and clearly, on a missing path (transformers would call it a bad repo id)."""
    text = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path)
        or text.startswith((".", "~", os.sep))
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
    )
    if looks_like_path and not Path(text).expanduser().exists():
        raise ModelError(f"model folder {text!r} does not exist")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer for the model; pad_token falls back to eos so batching works."""
    from transformers import AutoTokenizer

    _require_local_if_pathlike(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"tokenizer of {name_or_path!r} is a slow (Python) tokenizer; TVKD needs a fast one "
            "(a tokenizer.json): convert it with transformers and save it again"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config only (cheap: no weights are read)."""
    from transformers import AutoConfig

    _require_local_if_pathlike(name_or_path)
    try:
        return AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a model config from {name_or_path!r}: {exc}") from exc


def check_safetensors_folder(folder: Path) -> None:
    """Refuse a local folder whose weights are pickles: loading those can run arbitrary code."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); TVKD loads safetensors "
            "only. Convert it once: load it with transformers in a trusted session and call "
            "model.save_pretrained(dir) (writes model.safetensors)"
        )
    raise ModelError(f"{folder} holds no *.safetensors weights")


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM in eval mode from safetensors, with SDPA attention where supported."""
    import torch
    from transformers import AutoModelForCausalLM

    _require_local_if_pathlike(name_or_path)
    folder = _local_dir(name_or_path)
    if folder is not None:
        check_safetensors_folder(folder)
    kwargs: dict[str, Any] = {
        "dtype": dtype or torch.float32,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
    }
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path), attn_implementation="sdpa", **kwargs
            )
        except ValueError as exc:
            if "sdpa" not in str(exc).lower():
                raise
            logger.info("%s does not support SDPA attention; using eager", name_or_path)
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path), attn_implementation="eager", **kwargs
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {name_or_path!r}: {exc}") from exc
    return model.to(device).eval()


# The safetensors format's own bound on its JSON header (the reference reader refuses larger ones).
MAX_SAFETENSORS_HEADER = 100_000_000


def safetensors_param_count(folder: str | Path) -> int:
    """Number of stored weights, read from the safetensors headers only (no tensors loaded).
    Raises ModelError for a folder without weights or a file that is not safetensors (its header
    length is checked before anything is read, so a damaged file cannot make this allocate)."""
    total = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors weights")
    for file in files:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if not 0 < header_len <= min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ModelError(f"{file.name} is not a safetensors file (bad header length)")
            raw = fh.read(header_len)
        try:
            header = json.loads(raw)
            for name, info in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in info["shape"]:
                        count *= int(dim)
                    total += count
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelError(
                f"{file.name} is not a safetensors file (bad header: {type(exc).__name__})"
            ) from exc
    return total


def read_source(folder: str | Path) -> dict[str, Any] | None:
    """The folder's provenance record (`tvkd_source.json`), or None."""
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_source(folder: Path, record: dict[str, Any]) -> None:
    """Write the folder's provenance record (`tvkd_source.json`)."""
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
