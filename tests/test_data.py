"""Tests of tvkd.data (loading, bad rows, tokenization contract, fingerprint, split) and of
`tvkd data check`. Real files in tmp_path, a real (tiny, offline-trained) tokenizer."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tvkd.cli import main
from tvkd.data import (
    DataError,
    DataReport,
    PreferencePair,
    RowError,
    dataset_fingerprint,
    load_pairs,
    split_pairs,
)
from tvkd.tokenize import TokenizedPair, tokenize_pair, tokenize_pairs

TEXT_ROWS = [
    {"prompt": "Human: hi\n\nAssistant:", "chosen": " Hello there.", "rejected": " Go away."},
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "id": 7},
    {"prompt": "Tell me a joke.", "chosen": "A dog walks in…", "rejected": "No."},
]
USER = {"role": "user", "content": "What is the capital of France?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def shared_data_dir() -> Path:
    env = os.environ.get("TVKD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_source(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` in the format `path`'s name asks for ("...hf" = datasets save_to_disk)."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return write_jsonl(path, rows)
    if path.name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith("hf"):
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise AssertionError(path)
    return path


def issues_of(report: Any) -> set[tuple[int, str, str]]:
    return {(i.row, i.field, i.code) for i in report.issues}


# --------------------------------------------------------------------------------------------
# Sources and forms


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.parquet", "d_hf"])
def test_text_form_loads_from_every_source(tmp_path: Path, name: str) -> None:
    pairs, report = load_pairs(write_source(tmp_path / name, TEXT_ROWS))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in TEXT_ROWS
    ]
    assert [p.row for p in pairs] == [0, 1, 2]
    assert not any(p.conversational for p in pairs)
    assert (report.total_rows, report.kept, report.dropped, report.issues) == (3, 3, 0, [])


def test_datasets_dict_folder_picks_the_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(TEXT_ROWS),
            "test": datasets.Dataset.from_list(TEXT_ROWS[:1]),
        }
    ).save_to_disk(str(folder))
    assert len(load_pairs(folder)[0]) == 3
    assert len(load_pairs(folder, split="test")[0]) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        load_pairs(folder, split="dev")


def test_limit_reads_first_rows(tmp_path: Path) -> None:
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", TEXT_ROWS), limit=2)
    assert [p.row for p in pairs] == [0, 1] and report.total_rows == 2


CONV_A = [
    {
        "prompt": [SYSTEM, USER],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    },
    {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "Rome."}],
    },
]
CONV_B = [
    {
        "chosen": [SYSTEM, USER, {"role": "assistant", "content": "Paris."}],
        "rejected": [SYSTEM, USER, {"role": "assistant", "content": "Lyon."}],
    },
]
CONV_C = [{"messages": [SYSTEM, USER], "chosen": "Paris.", "rejected": "Lyon."}]


@pytest.mark.parametrize("rows", [CONV_A, CONV_B, CONV_C], ids=["a_prompt", "b_full", "c_messages"])
@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet", "d_hf"])
def test_conversational_forms(tmp_path: Path, rows: list[dict[str, Any]], name: str) -> None:
    path = write_source(tmp_path / name, rows)
    pairs, _ = load_pairs(path)
    assert pairs == load_pairs(path, format="conversational")[0]
    first = pairs[0]
    assert first.conversational and first.prompt == ""
    assert first.prompt_messages == (SYSTEM, USER)
    assert (first.chosen, first.rejected) == ("Paris.", "Lyon.")
    if rows is CONV_A:
        assert pairs[1].prompt_messages == (USER,) and pairs[1].rejected == "Rome."


def test_conversational_plain_string_responses(tmp_path: Path) -> None:
    # Layout (a) with string responses; a columnar file cannot mix them with message lists.
    rows = [CONV_A[0], {"prompt": [USER], "chosen": "Paris.", "rejected": "Rome."}]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(p.chosen, p.rejected) for p in pairs] == [("Paris.", "Lyon."), ("Paris.", "Rome.")]


def test_hh_form(tmp_path: Path) -> None:
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": prompt + " Paris.", "rejected": prompt + " No."}])
    (pair,), _ = load_pairs(path)
    assert pair == load_pairs(path, format="hh")[0][0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, " Paris.", " No.")
    assert not pair.conversational


def test_real_hh_file() -> None:
    path = shared_data_dir() / "hh-rlhf-harmless-base-test.jsonl.gz"
    assert path.is_file(), f"missing {path} (set TVKD_SHARED_DATA to the folder holding it)"
    with pytest.raises(DataError) as info:
        load_pairs(path)
    pairs, report = load_pairs(path, on_error="drop")
    assert info.value.report == report
    # 2,312 rows, 9 bad: 4 whose chosen final answer is empty (" " after the last Assistant
    # turn) and 5 whose response itself contains an "\n\nAssistant:" turn, so the text up to the
    # last Assistant turn differs between chosen and rejected. No row has chosen == rejected.
    assert (report.total_rows, report.kept, report.dropped) == (2312, 2303, 9)
    assert issues_of(report) == {
        *((row, "chosen", "empty_response") for row in (86, 516, 925, 1103)),
        *((row, "prompt", "template") for row in (1254, 1688, 1950, 1952, 2036)),
    }
    assert all(p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:") for p in pairs)
    assert all(p.chosen.startswith(" ") and p.rejected.startswith(" ") for p in pairs)


# --------------------------------------------------------------------------------------------
# Bad rows


def test_bad_rows_reported_with_row_and_field(tmp_path: Path) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lines = [
        json.dumps(good).encode(),  # 0
        b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}',  # 1 latin-1 byte
        b'{"prompt": "p", "chosen": ',  # 2 truncated
        json.dumps({"prompt": "p", "rejected": "b"}).encode(),  # 3
        json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}).encode(),  # 4
        json.dumps({"prompt": "p", "chosen": "a", "rejected": " \n"}).encode(),  # 5
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode(),  # 6
        b"",  # 7 blank lines are skipped, not rows
        b"[1, 2]",  # 8
        json.dumps({"prompt": None, "chosen": "", "rejected": "b"}).encode(),  # 9
        json.dumps(good).encode(),  # 10
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = {
        (1, "<row>", "not_utf8"),
        (2, "<row>", "bad_json"),
        (3, "chosen", "missing_field"),
        (4, "chosen", "bad_type"),
        (5, "rejected", "empty_response"),
        (6, "rejected", "identical"),
        (8, "<row>", "bad_type"),
        (9, "prompt", "missing_field"),
    }
    with pytest.raises(DataError) as info:
        load_pairs(path)
    report = info.value.report
    assert issues_of(report) == expected  # every issue, not just the first
    assert "row 1" in str(info.value) and "'<row>'" in str(info.value)
    pairs, report = load_pairs(path, on_error="drop")
    assert [p.row for p in pairs] == [0, 10]
    assert (report.total_rows, report.kept, report.dropped) == (10, 2, 8)
    assert issues_of(report) == expected
    summary = report.summary()
    assert "10 rows, 2 kept, 8 dropped" in summary
    assert "row 6, field 'rejected': identical" in summary
    assert report.to_dict()["issues"][0] == {
        "row": 1,
        "field": "<row>",
        "code": "not_utf8",
        "message": report.issues[0].message,
    }
    assert "1 more issues" in report.summary(max_issues=7)
    assert DataReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    copy = pickle.loads(pickle.dumps(info.value))  # e.g. sent back from a worker process
    assert copy.report == info.value.report and str(copy) == str(info.value)


def test_bad_hh_and_conversational_rows(tmp_path: Path) -> None:
    prompt = "\n\nHuman: Hi\n\nAssistant:"
    hh = [
        {"chosen": prompt + " a", "rejected": prompt + " b"},
        {"chosen": "\n\nHuman: Hi there", "rejected": prompt + " b"},  # no Assistant turn
        {"chosen": prompt + " a", "rejected": "\n\nHuman: Other\n\nAssistant: b"},  # prompts differ
        {"chosen": prompt + " a", "rejected": prompt + " a"},
    ]
    _, report = load_pairs(write_jsonl(tmp_path / "hh.jsonl", hh), on_error="drop")
    assert issues_of(report) == {
        (1, "chosen", "template"),
        (2, "prompt", "template"),
        (3, "rejected", "identical"),
    }
    reply = {"role": "assistant", "content": "x"}
    conv = [
        {"prompt": [USER], "chosen": [reply, reply], "rejected": "y"},  # two assistant messages
        {"prompt": [USER], "chosen": [USER], "rejected": "y"},  # wrong role
        {"prompt": [USER, {"role": "user"}], "chosen": "x", "rejected": "y"},  # no content
        {"prompt": [], "chosen": "x", "rejected": "y"},
        {"prompt": [USER], "chosen": [], "rejected": "y"},
    ]
    _, report = load_pairs(write_jsonl(tmp_path / "conv.jsonl", conv), on_error="drop")
    assert issues_of(report) == {
        (0, "chosen", "template"),
        (1, "chosen", "template"),
        (2, "prompt[1].content", "bad_type"),
        (3, "prompt", "missing_field"),
        (4, "chosen", "empty_response"),
    }
    full = [
        {"chosen": [USER, reply, USER, reply], "rejected": [USER, {**reply, "content": "z"}]},
        {"chosen": [USER, reply, reply], "rejected": [USER, reply, {**reply, "content": "z"}]},
    ]
    _, report = load_pairs(write_jsonl(tmp_path / "full.jsonl", full), on_error="drop")
    assert issues_of(report) == {(0, "chosen", "template"), (1, "prompt", "template")}


def test_unusable_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "nope.jsonl")
    not_list = tmp_path / "d.json"
    not_list.write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list"):
        load_pairs(not_list)
    columns = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="no 'chosen'/'rejected' columns"):
        load_pairs(columns)
    with pytest.raises(ValueError, match="format"):
        load_pairs(columns, format="csv")


# --------------------------------------------------------------------------------------------
# Tokenization


def text_pair(**kw: Any) -> PreferencePair:
    fields = {
        "row": 0,
        "prompt": "Human: What is the capital of France?\n\nAssistant:",
        "chosen": " The capital of France is Paris.",
        "rejected": " I can't help with that.",
    }
    return PreferencePair(**{**fields, **kw})


def conv_pair(**kw: Any) -> PreferencePair:
    fields = {
        "row": 3,
        "prompt": "",
        "chosen": "Paris, of course.",
        "rejected": "No idea!",
        "prompt_messages": (SYSTEM, USER),
    }
    return PreferencePair(**{**fields, **kw})


def check_ends(tokenizer: Any, ids: list[int], ends: list[int], content: str, n_tail: int) -> None:
    """Ends are non-decreasing, end at len(content), and match the decoded text exactly for the
    content tokens (ASCII content, so every byte-level token ends on a character boundary)."""
    assert len(ends) == len(ids)
    assert ends == sorted(ends) and ends[-1] == len(content)
    for k in range(len(ids) - n_tail):
        assert tokenizer.decode(ids[: k + 1]) == content[: ends[k]]
    assert ends[len(ids) - n_tail :] == [len(content)] * n_tail


def test_text_form_tokenization(tiny_tokenizer: Any) -> None:
    pair = text_pair()
    tp = tokenize_pair(tiny_tokenizer, pair, max_length=128, index=5)
    assert (tp.index, tp.row) == (5, 0)
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert tp.prompt_ids == tiny_tokenizer(pair.prompt)["input_ids"]
    assert tp.prompt_ids[0] == bos and tp.prompt_ids.count(bos) == 1
    for content, ids, ends in (
        (pair.chosen, tp.chosen_ids, tp.chosen_ends),
        (pair.rejected, tp.rejected_ids, tp.rejected_ends),
    ):
        assert ids[-1] == eos and ids.count(eos) == 1  # EOS appended and counted in T
        assert ids[:-1] == tiny_tokenizer(content, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(tp.prompt_ids + ids) == "<s>" + pair.prompt + content + "</s>"
        check_ends(tiny_tokenizer, ids, ends, content, n_tail=1)


def test_prompt_already_starting_with_bos_gets_no_second_one(tiny_tokenizer: Any) -> None:
    tp = tokenize_pair(tiny_tokenizer, text_pair(prompt="<s>Hello"), max_length=64)
    assert tp.prompt_ids.count(tiny_tokenizer.bos_token_id) == 1


def test_conversational_tokenization(tiny_tokenizer: Any) -> None:
    pair = conv_pair()
    tp = tokenize_pair(tiny_tokenizer, pair, max_length=128)
    prompt_text = tiny_tokenizer.apply_chat_template(
        list(pair.prompt_messages), tokenize=False, add_generation_prompt=True
    )
    bos = tiny_tokenizer.bos_token_id
    assert prompt_text.startswith("<s>")  # the template writes BOS itself ...
    assert tp.prompt_ids.count(bos) == 1 and tp.prompt_ids[0] == bos  # ... so no double BOS
    assert tiny_tokenizer.decode(tp.prompt_ids) == prompt_text
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for content, ids, ends in (
        (pair.chosen, tp.chosen_ids, tp.chosen_ends),
        (pair.rejected, tp.rejected_ids, tp.rejected_ends),
    ):
        # The response is the content plus the end-of-turn token; the "\n" after it is not.
        assert tiny_tokenizer.decode(ids) == content + "<|im_end|>"
        assert ids[-1] == im_end and tiny_tokenizer.eos_token_id not in ids
        full = tiny_tokenizer.apply_chat_template(
            [*pair.prompt_messages, {"role": "assistant", "content": content}], tokenize=False
        )
        assert full.startswith(tiny_tokenizer.decode(tp.prompt_ids + ids))
        check_ends(tiny_tokenizer, ids, ends, content, n_tail=1)


def test_template_that_trims_content(tiny_tokenizer_factory: Callable[..., Any]) -> None:
    # Llama-3-style: the template strips the content, so the content is found by its stripped
    # text and the ends stay in the coordinates of the original (unstripped) string.
    trimming = tiny_tokenizer_factory(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    pair = conv_pair(chosen="  Paris. ")
    tp = tokenize_pair(trimming, pair, max_length=128)
    assert trimming.decode(tp.chosen_ids) == "Paris.<|im_end|>"
    assert tp.prompt_ids[0] == trimming.bos_token_id  # no BOS in this template: added once
    ids, ends = tp.chosen_ids, tp.chosen_ends
    assert ends == sorted(ends) and ends[-1] == len(pair.chosen)
    for k in range(len(ids) - 1):  # the stripped leading "  " counts as already consumed
        assert "  " + trimming.decode(ids[: k + 1]) == pair.chosen[: ends[k]]
    assert ends[-2] == len("  Paris.")


def test_template_errors(tiny_tokenizer_factory: Callable[..., Any]) -> None:
    no_template = tiny_tokenizer_factory(None)
    with pytest.raises(RowError) as info:
        tokenize_pair(no_template, conv_pair(), max_length=128)
    assert (info.value.issue.field, info.value.issue.code) == ("prompt", "template")
    with pytest.raises(DataError, match="chat template"):  # a setup error: raised even in drop
        tokenize_pairs(no_template, [text_pair(), conv_pair()], max_length=128, on_error="drop")
    assert tokenize_pairs(no_template, [text_pair()], max_length=128)[1].kept == 1
    # A template that rewrites the assistant content does not round-trip.
    upper = tiny_tokenizer_factory(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(RowError) as info:
        tokenize_pair(upper, conv_pair(), max_length=128)
    assert (info.value.issue.row, info.value.issue.field, info.value.issue.code) == (
        3,
        "chosen",
        "template",
    )
    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenize_pair(object(), text_pair(), max_length=128)


def test_too_long(tiny_tokenizer: Any) -> None:
    pair = text_pair()
    tp = tokenize_pair(tiny_tokenizer, pair, max_length=128)
    n_prompt, n_chosen, n_rejected = len(tp.prompt_ids), len(tp.chosen_ids), len(tp.rejected_ids)
    assert n_chosen != n_rejected
    longest = max(n_chosen, n_rejected)
    assert tokenize_pair(tiny_tokenizer, pair, max_length=n_prompt + longest) == tp
    with pytest.raises(RowError) as info:
        tokenize_pair(tiny_tokenizer, pair, max_length=n_prompt + longest - 1)
    assert info.value.issue.code == "too_long"
    assert info.value.issue.field == ("chosen" if n_chosen > n_rejected else "rejected")
    with pytest.raises(RowError) as info:
        tokenize_pair(tiny_tokenizer, pair, max_length=n_prompt)
    assert (info.value.issue.field, info.value.issue.code) == ("prompt", "too_long")
    short = text_pair(row=9, prompt="Hi", chosen=" a", rejected=" b")
    with pytest.raises(DataError) as err:
        tokenize_pairs(tiny_tokenizer, [pair, short], max_length=n_prompt)
    assert issues_of(err.value.report) == {(0, "prompt", "too_long")}
    out, report = tokenize_pairs(tiny_tokenizer, [pair, short], max_length=n_prompt, on_error="drop")
    assert [(t.index, t.row) for t in out] == [(1, 9)]
    assert (report.total_rows, report.kept, report.dropped) == (2, 1, 1)


def test_tokenize_real_hh_rows(tiny_tokenizer: Any) -> None:
    """The HH text form on real rows: prompt prefix + response round-trips, ends well formed."""
    pairs, _ = load_pairs(
        shared_data_dir() / "hh-rlhf-harmless-base-test.jsonl.gz", on_error="drop", limit=40
    )
    out, report = tokenize_pairs(tiny_tokenizer, pairs, max_length=100_000)
    assert report.kept == len(pairs) == len(out)
    for pair, tp in zip(pairs, out, strict=True):
        assert isinstance(tp, TokenizedPair)
        text = tiny_tokenizer.decode(tp.prompt_ids + tp.rejected_ids)
        assert text == "<s>" + pair.prompt + pair.rejected + "</s>"
        for content, ends in ((pair.chosen, tp.chosen_ends), (pair.rejected, tp.rejected_ends)):
            assert ends == sorted(ends) and ends[-1] == len(content) and ends[0] >= 0


# --------------------------------------------------------------------------------------------
# Fingerprint and split


def test_fingerprint() -> None:
    pairs = [text_pair(), conv_pair()]
    base = dataset_fingerprint(pairs)
    assert len(base) == 64 and base == dataset_fingerprint([text_pair(), conv_pair()])
    assert base == dataset_fingerprint([text_pair(row=99), conv_pair()])  # row is provenance
    variants = [
        [text_pair(prompt="x"), conv_pair()],
        [text_pair(chosen="x"), conv_pair()],
        [text_pair(rejected="x"), conv_pair()],
        [text_pair(), conv_pair(prompt_messages=(USER,))],
        [text_pair(), conv_pair(prompt_messages=(SYSTEM, {**USER, "role": "system"}))],
        [text_pair(), conv_pair(prompt_messages=(SYSTEM, {**USER, "content": "x"}))],
        [text_pair(prompt_messages=()), conv_pair()],  # text vs conversational
        [conv_pair(), text_pair()],  # order matters
        [text_pair()],
    ]
    prints = {dataset_fingerprint(v) for v in variants}
    assert len(prints) == len(variants) and base not in prints


def test_split_pairs() -> None:
    pairs = [text_pair(row=i, chosen=f" answer {i}") for i in range(50)]
    train, evaluation = split_pairs(pairs, eval_fraction=0.2, seed=1)
    assert (len(train), len(evaluation)) == (40, 10)
    assert {p.row for p in train}.isdisjoint(p.row for p in evaluation)
    assert sorted(p.row for p in train + evaluation) == list(range(50))
    assert [p.row for p in train] == sorted(p.row for p in train)  # input order kept
    assert split_pairs(pairs, eval_fraction=0.2, seed=1) == (train, evaluation)
    assert split_pairs(pairs, eval_fraction=0.2, seed=2)[1] != evaluation
    assert len(split_pairs(pairs[:2], eval_fraction=0.01, seed=0)[1]) == 1
    assert split_pairs(pairs[:1], eval_fraction=0.5, seed=0) == (pairs[:1], [])
    assert split_pairs(pairs, eval_fraction=0.0, seed=0) == (pairs, [])
    with pytest.raises(ValueError):
        split_pairs(pairs, eval_fraction=1.0, seed=0)


# --------------------------------------------------------------------------------------------
# CLI


def test_every_accepted_suffix_loads_and_the_cli_names_them_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unsupported-type message lists exactly the suffixes `read_source` accepts (one list,
    tvkd.sources.DATA_SUFFIXES, which the service's upload check uses too)."""
    from tvkd.sources import DATA_SUFFIXES

    assert {".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz", ".parquet"} <= set(
        DATA_SUFFIXES
    )
    for suffix in DATA_SUFFIXES:
        path = tmp_path / f"d{suffix}"
        base = suffix.removesuffix(".gz")
        if base in (".jsonl", ".ndjson"):
            data = "".join(json.dumps(r) + "\n" for r in TEXT_ROWS).encode()
        elif base == ".json":
            data = json.dumps(TEXT_ROWS).encode()
        else:
            write_source(path, TEXT_ROWS)
            data = None
        if data is not None:
            path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
        pairs, report = load_pairs(path)
        assert len(pairs) == len(TEXT_ROWS) and not report.issues, suffix
    other = tmp_path / "d.txt"
    other.write_text(json.dumps(TEXT_ROWS[0]) + "\n")
    assert main(["data", "check", str(other)]) == 1
    captured = capsys.readouterr()
    message = captured.out + captured.err
    listed = re.search(r"unsupported file type \(use ([^)]*?)(?:, or a folder)?\)", message)
    assert listed is not None, message
    assert sorted(re.split(r",? or |, ", listed.group(1))) == sorted(DATA_SUFFIXES), message


def test_data_check_does_not_leak_the_transformers_length_warning(
    tmp_path: Path, tiny_tokenizer_factory: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """tvkd measures row lengths itself (too_long, the model windows); transformers' "Token
    indices sequence length is longer than the specified maximum sequence length" warning about
    the rows it tokenizes on purpose is noise in `tvkd data check --tokenizer`."""
    tokenizer = tiny_tokenizer_factory()  # a fresh instance: transformers warns once per tokenizer
    tokenizer.model_max_length = 8
    model_dir = tmp_path / "tok8"
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": "A long question about " + "many things " * 20, "chosen": " yes", "rejected": " no"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    capfd.readouterr()
    assert main(["data", "check", str(path), "--tokenizer", str(model_dir), "--max-length", "512"]) == 0
    captured = capfd.readouterr()
    assert "OK: 1 usable pairs" in captured.out
    assert "sequence length is longer" not in captured.out + captured.err


def test_cli_data_check(tmp_path: Path, tiny_tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [*TEXT_ROWS, {"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "4 rows, 3 kept, 1 dropped" in out and "row 3, field 'rejected': identical" in out
    assert main(["data", "check", str(path), "--drop"]) == 0
    assert "OK: 3 usable pairs, 1 bad rows dropped" in capsys.readouterr().out
    assert main(["data", "check", str(write_jsonl(tmp_path / "ok.jsonl", TEXT_ROWS))]) == 0
    capsys.readouterr()

    model_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(model_dir)
    args = ["data", "check", str(path), "--drop", "--tokenizer", str(model_dir)]
    assert main([*args, "--max-length", "64"]) == 0
    assert main([*args, "--max-length", "12"]) == 0
    out = capsys.readouterr().out
    assert "too_long" in out and "field 'chosen'" in out
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 1
    assert "no such dataset" in capsys.readouterr().err
