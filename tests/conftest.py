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
# offline by tvkd.model_prep.build_tiny_model (vocab 512, hidden 64, 2 layers, untied head). Returned
# as a str path, the form jobs pass teachers in.


@pytest.fixture(scope="session")
def precompute_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tvkd.model_prep import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("precompute-teacher") / "teacher", seed=1))


# --------------------------------------------------------------------------------------------
# Training (tests of tvkd.trainer / tvkd.pipeline / tvkd.cli.train): a tiny student and teacher
# sharing a tokenizer (same vocab and corpus, other weights), a third model with a tokenizer of
# its own (other vocab size and corpus), a learnable arithmetic preference task ("Q: 3+4=" →
# chosen " 7", rejected a near miss) and its teacher value store, and a callbacks recorder.

ARITH_PAIRS = 64
ARITH_MAX_LENGTH = 64
_OTHER_CORPUS = tuple(
    [f"Q: {a}+{b}= {a + b}. Sum of {a} and {b}." for a in range(10) for b in range(10)]
    + ["Numbers like 12, 345 and 6789 are split into digits by small vocabularies."] * 5
)


def arithmetic_rows(n: int = ARITH_PAIRS, seed: int = 0) -> list[dict[str, str]]:
    """Text-form pairs: chosen is the right sum, rejected a near miss (deterministic in seed)."""
    import random

    rng = random.Random(seed)
    rows = []
    for a in range(10):
        for b in range(10):
            wrong = a + b + rng.choice([-2, -1, 1, 2])
            wrong = wrong if wrong >= 0 else a + b + 1
            # Three phrasings, so prompts and responses differ in length (padding is exercised).
            prompt, chosen, rejected = [
                (f"Q: {a}+{b}=", f" {a + b}", f" {wrong}"),
                (f"What is {a}+{b}?", f" The answer is {a + b}.", f" The answer is {wrong}."),
                (f"Q: {a}+{b}=", f" {a + b}", f" {wrong}, I think"),
            ][(a + b) % 3]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows[:n]


@pytest.fixture(scope="session")
def train_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"student", "teacher", "other"} model folders (str). student/teacher share a tokenizer."""
    from tvkd.model_prep import build_tiny_model

    root = tmp_path_factory.mktemp("train-models")
    return {
        "student": str(build_tiny_model(root / "student", seed=0)),
        "teacher": str(build_tiny_model(root / "teacher", seed=1)),
        "other": str(build_tiny_model(root / "other", vocab_size=300, seed=2, corpus=_OTHER_CORPUS)),
    }


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JSONL file of `arithmetic_rows()`."""
    import json

    path = tmp_path_factory.mktemp("arith") / "arith.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in arithmetic_rows()) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def arith_store(train_models: dict[str, str], arith_data: str, tmp_path_factory: pytest.TempPathFactory):
    """(pairs, ValueStore) of the teacher over the arithmetic pairs (value shaping defaults)."""
    from tvkd.config import PrecomputeConfig
    from tvkd.data import load_pairs
    from tvkd.precompute import precompute_values

    pairs, _ = load_pairs(arith_data)
    result = precompute_values(
        train_models["teacher"],
        pairs,
        PrecomputeConfig(max_length=ARITH_MAX_LENGTH),
        store_root=tmp_path_factory.mktemp("arith-stores"),
    )
    return pairs, result.store


@pytest.fixture(scope="session")
def recording_callbacks() -> type:
    """The class `RecordingCallbacks(stop_after=None)`: records every call; asks to stop once
    training progress has reached step `stop_after`."""
    from tvkd.callbacks import Callbacks

    class RecordingCallbacks(Callbacks):
        def __init__(self, stop_after: int | None = None) -> None:
            self.stop_after = stop_after
            self.stages: list[str] = []
            self.events: list[tuple[str, str]] = []
            self.metrics: list[tuple[int, str, dict[str, float]]] = []
            self.checkpoints: list[tuple[int, str]] = []
            self.progress: list[tuple[str, int, int]] = []

        def on_stage(self, stage, info):
            self.stages.append(stage)

        def on_progress(self, stage, done, total, eta_seconds):
            self.progress.append((stage, done, total))

        def on_metrics(self, step, metrics, split):
            self.metrics.append((step, split, dict(metrics)))

        def on_event(self, level, message, data=None):
            self.events.append((level, message))

        def on_checkpoint(self, step, path):
            self.checkpoints.append((step, path))

        def should_stop(self):
            steps = [done for stage, done, _ in self.progress if stage == "train"]
            return self.stop_after is not None and bool(steps) and max(steps) >= self.stop_after

        def train_metrics(self) -> dict[int, dict[str, float]]:
            return {s: m for s, split, m in self.metrics if split == "train"}

    return RecordingCallbacks
