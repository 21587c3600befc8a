"""One small tokenizer of each family users bring, built offline with the `tokenizers` library.

Each family reproduces the pieces of a real tokenizer.json that decide how a prompt and a
response tokenize (normalizer, pre-tokenizer, model options, decoder, post-processor and special
tokens) and its chat template, on a vocabulary small enough (≤ 512) for the tiny test models:

    gpt2         byte-level BPE, no BOS, EOS <|endoftext|>                 (GPT-2)
    llama3       byte-level BPE with the Llama-3 split regex, BOS by the post-processor,
                 <|eot_id|> end of turn, a template that trims the content  (Llama-3)
    qwen         byte-level BPE with the Qwen2 split regex, no BOS, ChatML, EOS <|im_end|> (Qwen2.5)
    spm_first    SentencePiece BPE: Metaspace prepend_scheme="first", split=False, byte fallback,
                 BOS by the post-processor, [INST] template                (Mistral)
    spm_always   SentencePiece BPE: Metaspace prepend_scheme="always", split=True, no byte
                 fallback, <start_of_turn>/<end_of_turn> template   (older conversions, Gemma-style turns)
    legacy       Llama-2 "legacy": normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer,
                 byte fallback, Strip decoder, Llama-2-chat template       (Llama-2)

`build(family, chat_template=True)` returns a transformers PreTrainedTokenizerFast; the backend
is trained once per family and process. Test helper only (imported by tests/test_*.py).
"""

from __future__ import annotations

import functools
import json
from typing import Any

FAMILIES = ("gpt2", "llama3", "qwen", "spm_first", "spm_always", "legacy")
VOCAB_SIZE = 500  # below the tiny model's 512, so a family tokenizer can drive a tiny model

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" + CHATML
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + eos_token }}{% else %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% else %}"
    "{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}{% endif %}{% endfor %}"
)

# family -> (bos, eos, pad, extra specials, template)
SPECIALS: dict[str, tuple[str | None, str, str, tuple[str, ...], str]] = {
    "gpt2": (None, "<|endoftext|>", "<|endoftext|>", ("<|im_start|>", "<|im_end|>"), CHATML),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
        LLAMA3_TEMPLATE,
    ),
    "qwen": (None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",), QWEN_TEMPLATE),
    "spm_first": ("<s>", "</s>", "<unk>", (), MISTRAL_TEMPLATE),
    "spm_always": ("<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>"), GEMMA_TEMPLATE),
    "legacy": ("<s>", "</s>", "<unk>", (), LLAMA2_TEMPLATE),
}

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun all day.",
    "What is the capital of France? The capital of France is Paris, of course.",
    "Please explain why the sky is blue in simple words, and thank you for asking.",
    "I am sorry, I can't help with that. Is there something else you would like to know?",
    "Sure! Here is a short answer: yes, you can. Thanks for asking, have a nice day.",
    "user assistant system model hello world, how are you today? I'm fine, thank you.",
    "Q: what is 2+2?\nA: 4\nQ: what is 3+5?\nA: 8\nAnswer: yes. Answer: no.",
    "Numbers like 12, 345 and 6789; symbols (like these) and [brackets] - all of them.",
)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def _byte_level(split: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _with_byte_fallback(tok: Any) -> Any:
    """The trained BPE rebuilt with <0x00>..<0xFF> in its vocabulary and byte_fallback on (as in
    Llama-2/Mistral tokenizer.json): a character the vocabulary lacks becomes its UTF-8 bytes."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for token in BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    spec["model"]["unk_token"] = "<unk>"
    return Tokenizer.from_str(json.dumps(spec))


@functools.cache
def backend_json(family: str) -> str:
    """tokenizer.json of the family (trained once per process)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    bos, eos, pad, extra, _ = SPECIALS[family]
    specials = list(dict.fromkeys([t for t in (bos, eos, pad, "<unk>", *extra) if t]))
    sentencepiece = family in ("spm_first", "spm_always", "legacy")
    # Byte-fallback families keep room for the 256 byte tokens added after training.
    vocab = VOCAB_SIZE - (len(BYTE_TOKENS) if family in ("spm_first", "legacy") else 0)
    tok = Tokenizer(models.BPE(unk_token="<unk>" if sentencepiece else None))
    alphabet: list[str] = pre_tokenizers.ByteLevel.alphabet() if not sentencepiece else []
    if family in ("gpt2", "llama3", "qwen"):
        tok.pre_tokenizer = _byte_level({"gpt2": None, "llama3": LLAMA3_SPLIT, "qwen": QWEN_SPLIT}[family])
        tok.decoder = decoders.ByteLevel()
    else:
        # SentencePiece trains on whitespace-split pieces (no merge crosses a "▁"); the tokenizer.json
        # of a converted model then runs without that split (split=False, or no pre-tokenizer).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    corpus = list(CORPUS)
    if family in ("spm_first", "legacy"):  # as in Llama-2: "\n" is not a piece, it falls back to <0x0A>
        corpus = [line.replace("\n", " ") for line in corpus]
    if sentencepiece:
        # Character coverage of printable ASCII (the vocabulary lacks "é", "日" etc.: byte fallback
        # spells them in bytes, spm_always has none and gives <unk>).
        ascii_chars = {chr(c) for c in range(33, 127)}
        alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | ascii_chars | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator([line for line in corpus for _ in range(4)], trainer=trainer)
    if family in ("spm_first", "legacy"):
        tok = _with_byte_fallback(tok)
    if family == "spm_first":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    elif family == "spm_always":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    elif family == "legacy":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size() <= 512, (family, tok.get_vocab_size())
    return tok.to_str()


def build(family: str, chat_template: bool = True) -> Any:
    """A fresh PreTrainedTokenizerFast of `family`, with its chat template or none."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, extra, template = SPECIALS[family]
    kwargs: dict[str, Any] = {"bos_token": bos} if bos else {}
    if family in ("spm_first", "spm_always", "legacy"):
        kwargs["unk_token"] = "<unk>"
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend_json(family)),
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=list(extra),
        clean_up_tokenization_spaces=False,
        chat_template=template if chat_template else None,
        **kwargs,
    )
