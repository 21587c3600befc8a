"""Tokenization is exact for every tokenizer family (issue 9, field case fc01).

One offline tokenizer of each family (tests/tokenizer_families.py: GPT-2, Llama-3, Qwen byte-level
BPE; SentencePiece Metaspace "first" and "always"; Llama-2 legacy normalizer; byte fallback), with
and without a chat template, on the same rows, checked for the three properties of tvkd.tokenize:
exact ids (against the tokenizer's own encoding of the rendered text, computed here without
tvkd), one end-of-response token, and the decode round trip; then the teacher side of the
precompute (values against a forward over the rendered text's ids) and the cross-tokenizer
boundary mapping (character offsets against decoding)."""

from __future__ import annotations

import bisect
import shutil
from typing import Any

import numpy as np
import pytest
import tokenizer_families as tf
import torch

from tvkd.batch import build_train_pairs
from tvkd.config import PrecomputeConfig
from tvkd.data import DataError, PreferencePair, RowError
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.precompute import precompute_values
from tvkd.tokenize import decodes_to, tokenize_pair, tokenize_pairs

TEXT_PAIRS = [
    PreferencePair(
        0,
        "Q: what is the capital of France?\nA:",
        " The capital of France is Paris.",
        " I am sorry, I can't help with that.",
    ),
    PreferencePair(1, "Please explain why the sky is blue.", " Because the sky is blue.", " No."),
]
USER = {"role": "user", "content": "What is the capital of France?"}
CONV_PAIRS = [
    PreferencePair(0, "", "The capital of France is Paris.", "I can't help with that.", (USER,)),
    PreferencePair(
        1,
        "",
        "4",
        "Is there something else you would like to know?",
        (
            {"role": "user", "content": "hello world, how are you today?"},
            {"role": "assistant", "content": "I'm fine, thank you."},
            {"role": "user", "content": "What is 2+2?"},
        ),
    ),
]
# The end-of-turn token each family's template closes an assistant turn with.
END_OF_TURN = {
    "gpt2": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "qwen": "<|im_end|>",
    "spm_first": "</s>",
    "spm_always": "<end_of_turn>",
    "legacy": "</s>",
}
BYTE_LEVEL = ("gpt2", "llama3", "qwen")


def rendered(tok: Any, pair: PreferencePair, side: str) -> tuple[str, str]:
    """(prompt text, prompt + response text) as a user of the tokenizer renders them."""
    content = getattr(pair, side)
    if pair.prompt_messages is None:
        return pair.prompt, pair.prompt + content
    messages = list(pair.prompt_messages)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": content}], tokenize=False)
    return prompt, full


def encode(tok: Any, text: str) -> list[int]:
    """The tokenizer's ids for a whole text (its BOS added unless the text writes it)."""
    starts_with_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
    return tok(text, add_special_tokens=not starts_with_bos)["input_ids"]


def check_pair(tok: Any, family: str, pair: PreferencePair) -> Any:
    """The three properties for one pair; returns its TokenizedPair."""
    tp = tokenize_pair(tok, pair, max_length=512)
    end_ids = {tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN[family])}
    for side in ("chosen", "rejected"):
        ids = getattr(tp, f"{side}_ids")
        prompt_text, full_text = rendered(tok, pair, side)
        # 1. exact: the ids are the tokenizer's own for the rendered text
        assert tp.prompt_ids == encode(tok, prompt_text), (family, side)
        whole = encode(tok, full_text)
        if pair.prompt_messages is None:
            whole = [*whole, tok.eos_token_id]  # text form: EOS appended to the response
        n = len(tp.prompt_ids) + len(ids)
        assert tp.prompt_ids + ids == whole[:n], (family, side, tok.convert_ids_to_tokens(ids))
        # What the template writes after the end of turn is whitespace ("\n"), never response.
        assert tok.decode(whole[n:]).strip() == "", (family, side)
        # 2. one end-of-response token, the last one
        assert ids[-1] in end_ids and not end_ids & set(ids[:-1]), (family, side)
        # 3. round trip: the ids decode to the rendered text (BOS in front when the tokenizer added it)
        if pair.prompt_messages is None:
            text = full_text + tok.eos_token
        else:
            eot = END_OF_TURN[family]
            text = full_text[: full_text.index(eot, len(prompt_text)) + len(eot)]
        if tok.bos_token is not None and not text.startswith(tok.bos_token):
            text = tok.bos_token + text
        assert decodes_to(tok, tp.prompt_ids + ids, text) is None, (family, side)
        if family in BYTE_LEVEL:  # their decoders are exact inverses: no run-by-run decoding needed
            assert tok.decode(tp.prompt_ids + ids) == text
    return tp


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_text_rows_without_template(family: str) -> None:
    tok = tf.build(family, chat_template=False)
    for pair in TEXT_PAIRS:
        check_pair(tok, family, pair)
    with pytest.raises(DataError, match="chat template"):  # conversational rows need one
        tokenize_pairs(tok, CONV_PAIRS, max_length=512, on_error="drop")


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_rows_with_template(family: str) -> None:
    tok = tf.build(family, chat_template=True)
    for pair in TEXT_PAIRS + CONV_PAIRS:
        check_pair(tok, family, pair)


def test_characters_the_vocabulary_lacks() -> None:
    """Byte fallback spells "é" in bytes and round-trips; without it (spm_always) the row is a
    named round_trip bad row, not a silent <unk>."""
    pair = PreferencePair(0, "Say it in French:", " café crème", " coffee, please.")
    for family in tf.FAMILIES:
        tok = tf.build(family, chat_template=False)
        if family == "spm_always":
            with pytest.raises(RowError) as info:
                tokenize_pair(tok, pair, max_length=512)
            assert (info.value.issue.field, info.value.issue.code) == ("chosen", "round_trip")
            assert "café" in info.value.issue.message and "<unk>" in info.value.issue.message
        else:
            tp = check_pair(tok, family, pair)
            if family in ("spm_first", "legacy"):
                assert "<0xC3>" in tok.convert_ids_to_tokens(tp.chosen_ids)  # spelled in bytes


def test_tokens_merging_across_the_boundary_make_a_named_bad_row() -> None:
    # The prompt ends with the space the response's first word needs: " yes" is one token.
    pair = PreferencePair(4, "Answer: ", "yes", "no")
    for family in tf.FAMILIES:
        tok = tf.build(family, chat_template=False)
        with pytest.raises(RowError) as info:
            tokenize_pair(tok, pair, max_length=512)
        issue = info.value.issue
        assert (issue.row, issue.field, issue.code) == (4, "chosen", "boundary"), family
        assert "trailing whitespace" in issue.message


def test_a_response_encoded_alone_is_caught_by_the_round_trip() -> None:
    """The fc01 fault: encoding the response alone gives dummy-prefix families a "▁" the text
    does not have; the round trip sees it. Byte-level families encode it alone identically."""
    pair = PreferencePair(0, "Q: what is 2+2?\nA:\n", "4", "5")
    for family in tf.FAMILIES:
        tok = tf.build(family, chat_template=False)
        tp = tokenize_pair(tok, pair, max_length=64)
        alone = tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        text = (tok.bos_token or "") + pair.prompt + "4" + tok.eos_token
        if family in BYTE_LEVEL:
            assert alone == tp.chosen_ids
        else:
            assert alone != tp.chosen_ids and tok.convert_ids_to_tokens(alone)[0].startswith("▁")
            assert decodes_to(tok, tp.prompt_ids + alone, text) is not None, family
        assert decodes_to(tok, tp.prompt_ids + tp.chosen_ids, text) is None, family


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_exactly_one_end_of_response_token(family: str) -> None:
    """fc04: a text response that already ends with EOS gets no second one; an end-of-response
    token inside a response is a named bad row."""
    tok = tf.build(family, chat_template=True)
    eos = tok.eos_token
    ended = PreferencePair(0, "Say hello:", " hello there" + eos, " go away" + eos + "\n")
    tp = check_pair(tok, family, PreferencePair(0, "Say hello:", " hello there", " go away"))
    got = tokenize_pair(tok, ended, max_length=64)
    assert (got.chosen_ids, got.rejected_ids) == (tp.chosen_ids, tp.rejected_ids)
    assert got.chosen_ids.count(tok.eos_token_id) == 1
    for pair in (
        PreferencePair(1, "Say hello:", " hello" + eos + " there", " go away"),
        PreferencePair(1, "", "hello" + END_OF_TURN[family] + " there", "go away", (USER,)),
    ):
        with pytest.raises(RowError) as info:
            tokenize_pair(tok, pair, max_length=64)
        assert (info.value.issue.row, info.value.issue.field, info.value.issue.code) == (
            1,
            "chosen",
            "special_token",
        )


def test_a_template_without_an_end_of_turn_token_gets_eos() -> None:
    tok = tf.build("gpt2", chat_template=False)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    pair = PreferencePair(0, "", "Paris.", "Lyon.", (USER,))
    tp = tokenize_pair(tok, pair, max_length=64)
    assert tok.decode(tp.chosen_ids) == " Paris.\n" + tok.eos_token
    assert tp.chosen_ids.count(tok.eos_token_id) == 1 and tp.chosen_ids[-1] == tok.eos_token_id


# --------------------------------------------------------------------------------------------
# The teacher side of the precompute and the cross-tokenizer mapping


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama folder per family: the same weights (vocab 512), the family's tokenizer."""
    from tvkd.model_prep import build_tiny_model

    root = tmp_path_factory.mktemp("family-models")
    tiny = build_tiny_model(root / "tiny", seed=3)
    out = {}
    for family in tf.FAMILIES:
        folder = root / family
        folder.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(tiny / name, folder / name)
        tf.build(family, chat_template=True).save_pretrained(folder)
        out[family] = str(folder)
    return out


@pytest.fixture(scope="module")
def family_stores(family_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("family-stores")
    pairs = TEXT_PAIRS + CONV_PAIRS
    return {
        family: precompute_values(folder, pairs, PrecomputeConfig(max_length=512), store_root=root).store
        for family, folder in family_models.items()
    }


def char_ends(tok: Any, ids: list[int], content: str) -> list[int]:
    """Where each response token ends in the content, from decoding the response's first k
    tokens (leading spaces aside: SentencePiece decoders strip the dummy prefix)."""
    lead = len(content) - len(content.lstrip(" "))
    body = content.lstrip(" ")
    out = []
    for k in range(len(ids) - 1):  # the last token is the end of the response
        text = tok.decode(ids[: k + 1]).lstrip(" ")
        if body.startswith(text):
            out.append(lead + len(text))
        else:
            assert text.startswith(body), (text, content)  # template text after the content
            out.append(len(content))
    return [*out, len(content)]


def test_teacher_side_values_are_those_of_the_rendered_text(
    family_models: dict[str, str], family_stores: dict[str, Any]
) -> None:
    """For every family the teacher ran on the ids of the rendered text: its stored V(s_1..s_{T+1})
    equal logsumexp of the model's logits over those ids, and the boundaries are right."""
    pairs = TEXT_PAIRS + CONV_PAIRS
    for family, folder in family_models.items():
        tok, model, store = load_tokenizer(folder), load_causal_lm(folder), family_stores[family]
        for i, pair in enumerate(pairs):
            tp = check_pair(tok, family, pair)
            values = store.pair(i)
            for side in ("chosen", "rejected"):
                ids = getattr(tp, f"{side}_ids")
                assert getattr(tp, f"{side}_ends") == char_ends(tok, ids, getattr(pair, side)), (family, side)
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([tp.prompt_ids + ids])).logits[0].double()
                p = len(tp.prompt_ids)
                want = torch.logsumexp(logits[p - 1 : p + len(ids)], dim=-1).numpy()
                np.testing.assert_allclose(getattr(values, f"{side}_values"), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("teacher", tf.FAMILIES)
def test_cross_tokenizer_mapping_keeps_character_offsets(
    teacher: str, family_models: dict[str, str], family_stores: dict[str, Any]
) -> None:
    """A student of every other family gets, at each of its token boundaries, the teacher's value
    at the latest teacher boundary at or before it, in characters of the content."""
    pairs = TEXT_PAIRS + CONV_PAIRS
    t_tok, store = load_tokenizer(family_models[teacher]), family_stores[teacher]
    for student in tf.FAMILIES:
        if student == teacher:
            continue
        s_tok = load_tokenizer(family_models[student])
        train, dropped = build_train_pairs(
            pairs,
            range(len(pairs)),
            tokenizer=s_tok,
            max_length=512,
            store=store,
            teacher_tokenizer=t_tok,
            same_tokenizer=False,
        )
        assert not dropped and len(train) == len(pairs)
        for i, (pair, tp) in enumerate(zip(pairs, train, strict=True)):
            t_pair = tokenize_pair(t_tok, pair, max_length=512)
            for side in ("chosen", "rejected"):
                content = getattr(pair, side)
                t_ends = char_ends(t_tok, getattr(t_pair, f"{side}_ids"), content)
                s_ids = list(getattr(tp, f"{side}_ids"))
                s_ends = char_ends(s_tok, s_ids, content)
                v_t = np.asarray(getattr(store.pair(i), f"{side}_values"))
                t_pos, s_pos = [0, *t_ends[:-1]], [0, *s_ends[:-1]]
                want = [v_t[0]] + [v_t[bisect.bisect_right(t_pos, s) - 1] for s in s_pos[1:]] + [v_t[-1]]
                np.testing.assert_array_equal(
                    getattr(tp, f"{side}_values"), np.float32(want), (teacher, student)
                )
