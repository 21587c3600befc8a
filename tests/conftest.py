"""Shared pytest fixtures. Each group is owned by the module whose tests need it; append new
groups below rather than editing another group."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# --------------------------------------------------------------------------------------------
# Tiny tokenizer (tests of tvkd.data): a byte-level BPE trained offline on a few sentences,
# wrapped as a transformers fast tokenizer with ChatML-style special tokens. Independent of the
# tiny models of tvkd.models, so data tests never need a model.

TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
# ChatML that starts with the BOS token, as many real templates do: the prompt must then not get
# a second BOS from add_special_tokens.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_CORPUS = (
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun all day.",
    "I am sorry, I can't help with that. Is there something else you would like to know?",
    "Sure! Here is a short answer: yes, you can. Thanks for asking, have a nice day.",
    "user assistant system hello world, how are you today? I'm fine, thank you very much.",
)


@functools.cache
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([line for line in _TINY_CORPUS for _ in range(5)], trainer)
    # add_special_tokens=True prepends BOS; TemplateProcessing keeps exact (untrimmed) offsets.
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    return backend.to_str()


def build_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A fresh tiny fast tokenizer (the BPE is trained once per session and reused)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab ~400) with <s>/</s>/<pad>, ChatML tokens and a template with BOS."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_factory() -> Callable[..., PreTrainedTokenizerFast]:
    """`factory(chat_template=...)` builds a variant (e.g. no template, a trimming template)."""
    return build_tiny_tokenizer


# --------------------------------------------------------------------------------------------
# Tiny teacher (tests of tvkd.store / tvkd.precompute): one tiny Llama folder per session, built
# offline by tvkd.models.build_tiny_model (vocab 512, hidden 64, 2 layers, untied head). Returned
# as a str path, the form jobs pass teachers in.


@pytest.fixture(scope="session")
def precompute_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tvkd.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("precompute-teacher") / "teacher", seed=1))
