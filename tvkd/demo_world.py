"""The default demo's models and data, built offline in seconds (`tvkd demo`, tvkd/cli/demo.py).

- `build_char_tokenizer`: a fast (Rust) Hugging Face tokenizer with one token per character of
  the task world of `tvkd.taskworld` (ids 0..2 PAD, BOS, EOS as there, then UNK, then the
  characters); its post-processor puts BOS in front, so a text row tokenizes as
  `tvkd.taskworld.sequence` does: BOS + prompt + answer + EOS.
- `build_char_model`: a small random Llama (transformers `LlamaConfig`) with that tokenizer.
- `write_world_data`: the task world's splits as JSON-lines datasets the service reads:
  demonstrations as `prompt`/`completion` rows (for SFT jobs; the wrong procedure's answer
  `wrong_rate` of the time), preference pairs as `prompt`/`chosen`/`rejected` rows, and the
  held-out splits (`dev`, `test`) as one pair per prompt whose row declares the gold checker
  (`checker: "tvkd.taskworld"` and the correct `answer`; `tvkd.scorers`), so the evaluate stage's
  generation evaluation reports `gen/gold_accuracy` on them.

Everything is a pure function of its arguments (same arguments, same bytes), and every folder
gets a provenance record (`tvkd.models.SOURCE_FILE`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tvkd import taskworld as tw
from tvkd.models import ModelError, write_source

UNK = "<unk>"
SPECIALS = ("<pad>", "<s>", "</s>", UNK)
CHAR_VOCAB = (*SPECIALS, *tw.CHARS)  # PAD, BOS, EOS keep taskworld's ids 0..2
CHECKER = "tvkd.taskworld"


def build_char_tokenizer(max_length: int = 64) -> Any:
    """A `PreTrainedTokenizerFast`, one token per character of `tvkd.taskworld.CHARS`.

    Other characters map to `<unk>` (and fail tvkd's round-trip check, naming the row). Decoding
    joins the characters without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=UNK,
        model_max_length=max_length,
    )


@dataclass(frozen=True)
class CharModel:
    """The shape of a character-level Llama (`build_char_model`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 32
    seed: int = 0


def build_char_model(out_dir: str | Path, shape: CharModel) -> Path:
    """A random `LlamaForCausalLM` of `shape` with the character tokenizer, saved to `out_dir`
    (safetensors, float32). Same arguments give byte-identical weights. Raises ModelError for a
    hidden size not divisible by the heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape.hidden_size % shape.num_heads:
        raise ModelError(f"hidden_size {shape.hidden_size} is not divisible by num_heads {shape.num_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(shape.max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(CHAR_VOCAB),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tw.BOS,
        eos_token_id=tw.EOS,
        pad_token_id=tw.PAD,
        tie_word_embeddings=False,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_source(out, {"kind": "taskworld-char-llama", **asdict(shape)})
    return out


def n_parameters(shape: CharModel) -> int:
    """Parameters of `build_char_model(shape)`'s model (embeddings and head counted apart)."""
    d, f, v = shape.hidden_size, shape.intermediate_size, len(CHAR_VOCAB)
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    return shape.num_layers * per_layer + 2 * v * d + d


@dataclass(frozen=True)
class WorldData:
    """Sizes (prompts per split, `tvkd.taskworld.SPLITS`) and how the datasets are made."""

    sizes: dict[str, int]
    seed: int = 0
    wrong_rate: float = 0.4
    pairs_per_prompt: int = 4

    def key(self) -> str:
        sizes = "-".join(str(self.sizes[s]) for s in tw.SPLITS)
        return f"w{self.seed}-{sizes}-r{self.wrong_rate:g}-p{self.pairs_per_prompt}"


def _held_out_rows(tasks: tuple[tw.Task, ...]) -> list[dict[str, Any]]:
    # One pair per prompt (the wrong procedure rejected): generation asks each prompt once.
    return [
        {
            "prompt": t.prompt,
            "chosen": t.answer,
            "rejected": t.wrong,
            "family": t.family,
            "answer": t.answer,
            "checker": CHECKER,
        }
        for t in tasks
    ]


def write_world_data(out_dir: str | Path, data: WorldData) -> dict[str, Path]:
    """Write the datasets of `data` to `out_dir`; returns their paths by name:

    `teacher_sft`, `student_sft` (prompt/completion demonstrations), `teacher_pref`,
    `student_pref` (`pairs_per_prompt` pairs per prompt), `dev`, `test` (held out, checker
    declared). Files already there are kept (they are a function of `data`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = tw.make_world(data.seed, data.sizes)
    rows: dict[str, list[dict[str, Any]]] = {}
    for k, name in enumerate(("teacher_sft", "student_sft")):
        demos = tw.demos(world.split(name), wrong_rate=data.wrong_rate, seed=data.seed + 11 + k)
        rows[name] = [{"prompt": p, "completion": r} for p, r in demos]
    for k, name in enumerate(("teacher_pref", "student_pref")):
        pairs = tw.pairs(world.split(name), per_prompt=data.pairs_per_prompt, seed=data.seed + 21 + k)
        rows[name] = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    rows["dev"], rows["test"] = _held_out_rows(world.dev), _held_out_rows(world.test)
    paths = {}
    for name, items in rows.items():
        path = paths[name] = out / f"{name}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
            tmp.replace(path)
    return paths
