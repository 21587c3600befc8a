"""The public preference layouts load without a conversion script (issue 9, field case fc23),
detected with a stated reason or given as `format`, with a column mapping; and conversational
rows keep tools and tool calls (fc11). Each layout's file is written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_data import write_jsonl, write_source

from tvkd.cli import main
from tvkd.data import DataError, PreferencePair, dataset_fingerprint, load_pairs
from tvkd.layouts import parse_columns
from tvkd.tokenize import tokenize_pair, tokenize_pairs

USER = {"role": "user", "content": "Name a primary colour."}
SYSTEM = {"role": "system", "content": "Answer briefly."}


def answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def layout_of(path: Path, **kw: Any) -> tuple[list[PreferencePair], Any]:
    pairs, report = load_pairs(path, on_error="drop", **kw)
    return pairs, report


# --------------------------------------------------------------------------------------------
# Each layout


def test_trl_text_explicit_and_implicit_prompt(tmp_path: Path) -> None:
    explicit = [{"prompt": "Q: colour?\nA:", "chosen": " Red.", "rejected": " Purple."}]
    (pair,), report = layout_of(write_jsonl(tmp_path / "t.jsonl", explicit))
    assert (report.layout, pair.prompt, pair.chosen, pair.rejected) == (
        "text",
        "Q: colour?\nA:",
        " Red.",
        " Purple.",
    )
    assert "explicit prompt" in report.layout_reason
    implicit = [
        {"chosen": "Q: colour?\nA: Red is primary.", "rejected": "Q: colour?\nA: Reddish purple."},
        {"chosen": "The sky is blue.", "rejected": "The sky is blue indeed."},  # chosen is all prefix
    ]
    pairs, report = layout_of(write_jsonl(tmp_path / "ti.jsonl", implicit))
    assert report.layout == "text_implicit" and "implicit prompt" in report.layout_reason
    # The prompt ends before the word where the texts differ (not inside "Red"/"Reddish").
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Q: colour?\nA:", " Red is primary.", " Reddish purple."),
        ("The sky is", " blue.", " blue indeed."),
    ]
    assert load_pairs(write_jsonl(tmp_path / "ti.jsonl", implicit), format="text")[0] == pairs


def test_trl_conversational_explicit_implicit_and_messages(tmp_path: Path) -> None:
    explicit = [{"prompt": [SYSTEM, USER], "chosen": [answer("Red.")], "rejected": [answer("Purple.")]}]
    implicit = [{"chosen": [SYSTEM, USER, answer("Red.")], "rejected": [SYSTEM, USER, answer("Purple.")]}]
    messages = [{"messages": [SYSTEM, USER], "chosen": "Red.", "rejected": "Purple."}]
    for rows, layout in (
        (explicit, "conversational"),
        (implicit, "conversational_implicit"),
        (messages, "conversational_messages"),
    ):
        for name in ("d.jsonl", "d.parquet", "d_hf"):
            path = write_source(tmp_path / f"{layout}-{name}", rows)
            (pair,), report = layout_of(path)
            assert report.layout == layout, (layout, name)
            assert (pair.prompt_messages, pair.chosen, pair.rejected) == ((SYSTEM, USER), "Red.", "Purple.")
            assert load_pairs(path, format="conversational")[0] == [pair]


def test_anthropic_hh(tmp_path: Path) -> None:
    prompt = "\n\nHuman: Name a primary colour.\n\nAssistant:"
    rows = [{"chosen": prompt + " Red.", "rejected": prompt + " Purple."}]
    (pair,), report = layout_of(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert report.layout == "hh" and "Anthropic HH" in report.layout_reason
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, " Red.", " Purple.")


def ultrafeedback_rows(with_messages: bool) -> list[dict[str, Any]]:
    rows = []
    for k, (question, good, bad) in enumerate(
        [
            ("Name a primary colour.", "Red is a primary colour.", "Purple."),
            ("What is 2+3?", "2+3 = 5.", "2+3 = 6."),
        ]
    ):
        user = {"role": "user", "content": question}
        row: dict[str, Any] = {
            "prompt": question,
            "prompt_id": f"id{k}",
            "chosen": [user, answer(good)],
            "rejected": [user, answer(bad)],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        if with_messages:
            row["messages"] = [user, answer(good)]
        rows.append(row)
    return rows


@pytest.mark.parametrize("with_messages", [True, False])
@pytest.mark.parametrize("name", ["uf.jsonl", "uf.parquet"])
def test_ultrafeedback_binarized(tmp_path: Path, with_messages: bool, name: str) -> None:
    """fc23: `prompt` string, whole `chosen`/`rejected` conversations, an extra `messages`."""
    path = write_source(tmp_path / name, ultrafeedback_rows(with_messages))
    for fmt in ("auto", "conversational"):
        pairs, report = load_pairs(path, format=fmt)  # no bad row at all
        assert report.layout == "conversational_implicit"
        assert "UltraFeedback" in report.layout_reason and "'prompt'" in report.layout_reason
        assert ("'messages' are not read" in report.layout_reason) == with_messages
        assert [(p.prompt_messages, p.chosen, p.rejected) for p in pairs] == [
            (({"role": "user", "content": "Name a primary colour."},), "Red is a primary colour.", "Purple."),
            (({"role": "user", "content": "What is 2+3?"},), "2+3 = 5.", "2+3 = 6."),
        ]
    with pytest.raises(DataError, match="format 'conversational'"):  # says what to use instead
        load_pairs(path, format="text")


def test_argilla_dpo_mix_multi_turn(tmp_path: Path) -> None:
    turns = [USER, answer("Red."), {"role": "user", "content": "Another one?"}]
    rows = [
        {
            "dataset": "mix",
            "chosen": [*turns, answer("Blue.")],
            "rejected": [*turns, answer("Pink.")],
            "chosen_rating": 5,
            "rejected_rating": 2,
        }
    ]
    (pair,), report = layout_of(write_jsonl(tmp_path / "mix.jsonl", rows))
    assert report.layout == "conversational_implicit" and "dpo-mix" in report.layout_reason
    assert (pair.prompt_messages, pair.chosen, pair.rejected) == (tuple(turns), "Blue.", "Pink.")


def test_intel_orca_dpo(tmp_path: Path) -> None:
    rows = [
        {
            "system": "Answer briefly.",
            "question": "Name a primary colour.",
            "chosen": "Red.",
            "rejected": "Purple.",
        },
        {"system": "", "question": "Name a primary colour.", "chosen": "Blue.", "rejected": "Pink."},
        {"system": "", "question": None, "chosen": "Blue.", "rejected": "Pink."},
    ]
    pairs, report = layout_of(write_source(tmp_path / "orca.parquet", rows))
    assert report.layout == "orca" and "orca_dpo_pairs" in report.layout_reason
    assert [(p.prompt_messages, p.chosen) for p in pairs] == [((SYSTEM, USER), "Red."), ((USER,), "Blue.")]
    assert [(i.row, i.field, i.code) for i in report.issues] == [(2, "question", "missing_field")]


def test_openai_preference_jsonl(tmp_path: Path) -> None:
    tool = {"type": "function", "function": {"name": "get_colour", "parameters": {"type": "object"}}}
    rows = [
        {
            "input": {"messages": [USER], "tools": [tool], "parallel_tool_calls": True},
            "preferred_output": [answer("Red.")],
            "non_preferred_output": [answer("Purple.")],
        },
        {"input": {"messages": [USER]}, "preferred_output": [answer("Red.")], "non_preferred_output": []},
    ]
    pairs, report = layout_of(write_jsonl(tmp_path / "openai.jsonl", rows))
    assert report.layout == "openai" and "OpenAI" in report.layout_reason
    assert [(p.prompt_messages, p.tools, p.chosen, p.rejected) for p in pairs] == [
        ((USER,), (tool,), "Red.", "Purple.")
    ]
    assert [(i.row, i.field, i.code) for i in report.issues] == [
        (1, "non_preferred_output", "empty_response")
    ]


def test_column_mapping(tmp_path: Path) -> None:
    rows = [
        {
            "instruction": "Q: colour?\nA:",
            "response_j": " Red.",
            "response_k": " Purple.",
            "prompt": "unused",
        },
        {"instruction": "Q: sky?\nA:", "response_j": 7, "response_k": " Green."},
    ]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    mapping = "prompt=instruction,chosen=response_j,rejected=response_k"
    pairs, report = load_pairs(path, columns=mapping, on_error="drop")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q: colour?\nA:", " Red.", " Purple.")]
    assert [(i.row, i.field, i.code) for i in report.issues] == [
        (1, "response_j", "bad_type")
    ]  # its own name
    assert load_pairs(path, columns=parse_columns(mapping), on_error="drop")[0] == pairs
    # A dotted source reads inside an object.
    nested = [{"data": {"q": [USER]}, "good": [answer("Red.")], "bad": [answer("Purple.")]}]
    (pair,), report = load_pairs(
        write_jsonl(tmp_path / "n.jsonl", nested),
        columns={"prompt": "data.q", "chosen": "good", "rejected": "bad"},
    )
    assert report.layout == "conversational" and pair.prompt_messages == (USER,)
    with pytest.raises(DataError, match="'nope' \\(mapped to 'prompt'\\) is not in the source"):
        load_pairs(path, columns="prompt=nope")
    for bad in ("prompt", "answer=x", "prompt=a,prompt=b"):
        with pytest.raises(ValueError, match="columns"):
            load_pairs(path, columns=bad)


def test_cli_says_which_layout_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows(True))
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "layout: conversational_implicit (" in out and "UltraFeedback" in out and "OK: 2 usable pairs" in out
    )
    assert main(["data", "check", str(path), "--format", "conversational"]) == 0
    assert main(["data", "check", str(path), "--format", "text"]) == 1
    assert "format 'conversational'" in capsys.readouterr().err
    mapped = write_jsonl(tmp_path / "m.jsonl", [{"q": "Q?", "a": " A.", "b": " B."}])
    assert main(["data", "check", str(mapped), "--columns", "prompt=q,chosen=a,rejected=b"]) == 0
    assert "layout: text (" in capsys.readouterr().out
    assert main(["data", "check", str(mapped), "--columns", "prompt"]) == 2


# --------------------------------------------------------------------------------------------
# Tools and tool calls (fc11)

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
# Qwen2.5-style: renders `tools` in the system turn and assistant `tool_calls` as <tool_call> blocks.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{%- if tools %}{{- '<|im_start|>system\nTools: ' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls %}{{- '\n<tool_call>\n' + tc.function | tojson + '\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def tool_rows(tools_as_json: bool = False) -> list[dict[str, Any]]:
    rows = []
    for content in ("", None):
        prompt = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": content, "tool_calls": [CALL]},
            {"role": "tool", "content": "18C, sunny"},
        ]
        rows.append(
            {
                "tools": json.dumps([TOOL]) if tools_as_json else [TOOL],
                "prompt": prompt,
                "chosen": [answer("It is 18C and sunny in Paris.")],
                "rejected": [answer("I cannot know the weather.")],
            }
        )
    return rows


@pytest.mark.parametrize("tools_as_json", [False, True])
def test_tools_and_tool_calls_reach_the_template(
    tmp_path: Path, tiny_tokenizer_factory: Any, tools_as_json: bool
) -> None:
    pairs, report = load_pairs(write_jsonl(tmp_path / "tools.jsonl", tool_rows(tools_as_json)))
    assert report.ok and len(pairs) == 2  # content null beside tool_calls is the OpenAI convention
    assert pairs[1].prompt_messages[1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert pairs[0].tools == (TOOL,)
    tok = tiny_tokenizer_factory(TOOLS_TEMPLATE)
    for pair in pairs:
        tp = tokenize_pair(tok, pair, max_length=1024)
        prompt = tok.decode(tp.prompt_ids)
        want = tok.apply_chat_template(
            [dict(m) for m in pair.prompt_messages], tools=[TOOL], tokenize=False, add_generation_prompt=True
        )
        assert prompt == want
        assert (
            "<tool_call>" in prompt and '"city": "Paris"' in prompt and "get_weather" in prompt.split("\n")[1]
        )
    # The fingerprint sees the tools (the value store key must change with them).
    assert dataset_fingerprint(pairs) != dataset_fingerprint(
        [PreferencePair(**{**vars(p), "tools": None}) for p in pairs]
    )


def test_a_template_that_cannot_render_tools_makes_named_bad_rows(
    tmp_path: Path, tiny_tokenizer_factory: Any
) -> None:
    pairs, _ = load_pairs(write_jsonl(tmp_path / "tools.jsonl", tool_rows()))
    # The tiny ChatML template renders role and content only: the tool call turn would be empty.
    plain = tiny_tokenizer_factory(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _, report = tokenize_pairs(plain, pairs, max_length=1024, on_error="drop")
    assert [(i.row, i.field, i.code) for i in report.issues] == [
        (0, "tools", "template"),
        (1, "tools", "template"),
    ]
    # Tools rendered, tool calls not: the assistant turn is named.
    no_calls = tiny_tokenizer_factory(
        "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _, report = tokenize_pairs(no_calls, pairs, max_length=1024, on_error="drop")
    assert [(i.row, i.field, i.code) for i in report.issues] == [
        (0, "prompt[1]", "template"),
        (1, "prompt[1]", "template"),
    ]
    assert "tool_calls" in report.issues[0].message
    # A template that concatenates content fails on null content: a named template error.
    strict = tiny_tokenizer_factory(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _, report = tokenize_pairs(strict, pairs[1:], max_length=1024, on_error="drop")
    assert [(i.field, i.code) for i in report.issues] == [("prompt", "template")]
    assert "chat template failed" in report.issues[0].message


def test_bad_tool_fields(tmp_path: Path) -> None:
    rows = tool_rows()
    bad = [
        {**rows[0], "tools": "not json"},
        {**rows[0], "tools": [1, 2]},
        {
            **rows[0],
            "prompt": [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}],
        },
        {**rows[0], "prompt": [USER, {"role": "assistant", "content": None}]},  # null without tool calls
        {
            **rows[0],
            "chosen": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
        },  # a call as response
        {"prompt": "text prompt", "chosen": "a", "rejected": "b", "tools": [TOOL]},
    ]
    _, report = load_pairs(write_jsonl(tmp_path / "bad.jsonl", bad[:5]), on_error="drop")
    assert [(i.row, i.field, i.code) for i in report.issues] == [
        (0, "tools", "bad_type"),
        (1, "tools", "bad_type"),
        (2, "prompt[1].tool_calls", "bad_type"),
        (3, "prompt[1].content", "bad_type"),
        (4, "chosen", "bad_type"),
    ]
    _, report = load_pairs(write_jsonl(tmp_path / "text.jsonl", bad[5:]), on_error="drop")
    assert [(i.row, i.field, i.code) for i in report.issues] == [(0, "tools", "bad_type")]


def test_a_source_with_no_object_rows_says_so_instead_of_a_guessed_layout_reason(tmp_path: Path) -> None:
    """An empty file, or one whose rows are not objects, was reported as 'text_implicit (strings
    without a prompt column ...)', which sends the user looking for the wrong fault."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _, report = load_pairs(empty, on_error="drop")
    assert report.layout_reason.startswith("no rows to detect a layout from")
    lists = tmp_path / "lists.jsonl"
    lists.write_text('[1, 2]\n"x"\n')
    _, report = load_pairs(lists, on_error="drop")
    assert report.layout_reason.startswith("no row that is a JSON object")
    assert [i.code for i in report.issues] == ["bad_type", "bad_type"]
