"""The per-token inspector (tvkd.inspect) and `tvkd inspect`, on tiny offline models.

Values and ψ are checked against the teacher's own full logits in float64 (V = logsumexp of the
logits at positions P−1 … P+T−1, the states s_1 … s_{T+1}), independently of tvkd.values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvkd.artifacts import InspectResult, read_samples
from tvkd.cli import main
from tvkd.config import MethodConfig
from tvkd.data import PreferencePair
from tvkd.inspect import inspect_response
from tvkd.model_prep import build_tiny_model
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.render import TOP_MARK, diverging_rgb, render_table, visible
from tvkd.tokenize import tokenize_pair

PROMPT = "Human: What is 2+3?\n\nAssistant:"
RESPONSE = " The answer is 5. Thank you for asking!"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect-models")
    return {
        "teacher": build_tiny_model(root / "teacher", seed=1),
        "student": build_tiny_model(root / "student", seed=2),
        # Another vocabulary size trains another BPE: a student with a different tokenizer.
        "other": build_tiny_model(root / "other", seed=3, vocab_size=300),
    }


@pytest.fixture(scope="module")
def teacher(model_dirs):
    return load_causal_lm(str(model_dirs["teacher"])), load_tokenizer(str(model_dirs["teacher"]))


def _reference_signals(model, tokenizer, prompt: str, response: str):
    """float64 V(s_1..s_{T+1}) and log π(y_t|s_t) from the model's full logits."""
    pair = PreferencePair(row=0, prompt=prompt, chosen=response, rejected=".")
    tp = tokenize_pair(tokenizer, pair, max_length=512)
    ids = torch.tensor([tp.prompt_ids + tp.chosen_ids])
    model64 = type(model)(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = model64(input_ids=ids).logits[0].double()
    p, t = len(tp.prompt_ids), len(tp.chosen_ids)
    z = logits[p - 1 : p + t]  # T+1 states
    values = torch.logsumexp(z, -1)
    logps = torch.log_softmax(z[:t], -1).gather(-1, ids[0, p : p + t, None]).squeeze(-1)
    return tp, values, logps


def test_values_and_psi_match_full_logits_float64(teacher):
    model, tok = teacher
    tp, v_ref, lp_ref = _reference_signals(model, tok, PROMPT, RESPONSE)
    res = inspect_response(model, tok, PROMPT, RESPONSE)
    t = len(tp.chosen_ids)
    assert [r.id for r in res.tokens] == tp.chosen_ids
    values = torch.tensor([r.value for r in res.tokens], dtype=torch.float64)
    torch.testing.assert_close(values, v_ref[:t], rtol=1e-5, atol=1e-5)
    assert res.value_start == pytest.approx(float(v_ref[0]), abs=1e-5)
    assert res.value_end == pytest.approx(float(v_ref[t]), abs=1e-5)
    psi = torch.tensor([r.psi for r in res.tokens], dtype=torch.float64)
    torch.testing.assert_close(psi, v_ref[1:] - v_ref[:-1], rtol=1e-5, atol=1e-5)
    t_logp = torch.tensor([r.teacher_logp for r in res.tokens], dtype=torch.float64)
    torch.testing.assert_close(t_logp, lp_ref, rtol=1e-5, atol=1e-5)
    assert res.sum_logratio is None and all(r.logratio is None for r in res.tokens)
    assert res.tokenization == "teacher"
    # The token texts are slices of the response (EOS decoded), so they rebuild it.
    assert "".join(r.text for r in res.tokens[:-1]) == RESPONSE
    assert res.tokens[-1].text == tok.eos_token


def test_sum_psi_telescopes_at_gamma_one(teacher):
    model, tok = teacher
    res = inspect_response(model, tok, PROMPT, RESPONSE, method=MethodConfig(gamma=1.0))
    assert res.sum_psi == pytest.approx(res.value_end - res.value_start, abs=1e-5)
    assert res.sum_psi == pytest.approx(sum(r.psi for r in res.tokens), abs=1e-6)


def test_gamma_and_terminal_zero(teacher):
    model, tok = teacher
    plain = inspect_response(model, tok, PROMPT, RESPONSE)
    res = inspect_response(model, tok, PROMPT, RESPONSE, method=MethodConfig(gamma=0.9, terminal="zero"))
    v = [r.value for r in plain.tokens] + [plain.value_end]
    for k, row in enumerate(res.tokens[:-1]):
        assert row.psi == pytest.approx(0.9 * v[k + 1] - v[k], abs=1e-5)
    assert res.tokens[-1].psi == pytest.approx(-v[-2], abs=1e-5)  # γ·0 − V(s_T)


def test_shaping_modes_follow_method(teacher):
    model, tok = teacher
    res = inspect_response(model, tok, PROMPT, RESPONSE, method=MethodConfig(shaping="logprob"))
    assert [r.psi for r in res.tokens] == pytest.approx([r.teacher_logp for r in res.tokens], abs=1e-6)
    none = inspect_response(model, tok, PROMPT, RESPONSE, method=MethodConfig(shaping="none"))
    assert none.sum_psi == 0.0


def test_conversational_prompt(teacher):
    model, tok = teacher
    messages = [{"role": "user", "content": "What is 2+3?"}]
    res = inspect_response(model, tok, messages, "It is 5.")
    assert res.prompt == messages
    assert res.tokens[-1].text == "<|im_end|>"  # the template's end-of-turn ends the response
    assert res.sum_psi == pytest.approx(res.value_end - res.value_start, abs=1e-5)


def test_logratio_with_student_and_reference(model_dirs, teacher):
    model, tok = teacher
    student = load_causal_lm(str(model_dirs["student"]))
    same = inspect_response(model, tok, PROMPT, RESPONSE, student_model=student, reference_model=student)
    assert same.sum_logratio == 0.0
    assert all(r.logratio == 0.0 for r in same.tokens)
    beta = 0.25
    res = inspect_response(
        model,
        tok,
        PROMPT,
        RESPONSE,
        method=MethodConfig(beta=beta),
        student_model=student,
        reference_model=model,
    )
    _, _, lp_teacher = _reference_signals(model, tok, PROMPT, RESPONSE)
    _, _, lp_student = _reference_signals(student, tok, PROMPT, RESPONSE)
    want = beta * (lp_student - lp_teacher)
    got = torch.tensor([r.logratio for r in res.tokens], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert res.sum_logratio == pytest.approx(float(want.sum()), abs=1e-4)
    with pytest.raises(ValueError, match="both"):
        inspect_response(model, tok, PROMPT, RESPONSE, student_model=student)


def test_different_student_tokenizer_rows_are_student_tokens(model_dirs, teacher):
    model, tok = teacher
    other = load_causal_lm(str(model_dirs["other"]))
    other_tok = load_tokenizer(str(model_dirs["other"]))
    t_res = inspect_response(model, tok, PROMPT, RESPONSE)
    res = inspect_response(
        model, tok, PROMPT, RESPONSE, student_model=other, reference_model=other, student_tokenizer=other_tok
    )
    s_ids = tokenize_pair(other_tok, PreferencePair(0, PROMPT, RESPONSE, "."), max_length=512).chosen_ids
    assert s_ids != [r.id for r in t_res.tokens]  # the two tokenizations really differ
    assert res.tokenization == "student"
    assert [r.id for r in res.tokens] == s_ids
    assert all(r.teacher_logp is None for r in res.tokens)
    # MATH.md property 8: the per-response Σψ is the teacher's, whatever the tokenization.
    assert res.sum_psi == pytest.approx(t_res.sum_psi, abs=1e-5)
    assert res.value_start == pytest.approx(t_res.value_start, abs=1e-6)
    assert res.value_end == pytest.approx(t_res.value_end, abs=1e-6)


def test_table_rows_marks_and_colour(teacher):
    model, tok = teacher
    res = inspect_response(model, tok, PROMPT, RESPONSE)
    plain = render_table(res, color=False)
    lines = plain.splitlines()
    token_lines = [ln for ln in lines if ln[:5].strip().isdigit()]
    assert len(token_lines) == len(res.tokens)
    assert plain.count(TOP_MARK) == 3
    top3 = sorted(res.tokens, key=lambda r: -r.psi)[:3]
    for r in top3:
        assert token_lines[r.index].endswith(TOP_MARK)
    assert "\x1b[" not in plain
    colored = render_table(res, color=True)
    assert "48;2;" in colored
    assert colored.count(TOP_MARK) == 3
    for signal in ("value", "teacher_logp"):
        assert render_table(res, color=True, signal=signal).count(TOP_MARK) == 3
    with pytest.raises(ValueError, match="logratio"):
        render_table(res, color=False, signal="logratio")  # no student: nothing to show


def test_visible_escapes_whitespace_and_control_characters():
    assert visible(" a\nb\tc\r") == "␣a\\nb\\tc\\r"
    assert visible("\x1b[31m") == "\\x1b[31m"  # no terminal escape can leak from a token
    assert visible("") == "∅"
    assert visible("\u200b") == "\\u200b"
    assert visible("héllo") == "héllo"


def test_diverging_scale():
    assert diverging_rgb(0.0, 1.0) == (255, 255, 255)
    r, _, b = diverging_rgb(1.0, 1.0)
    assert r > b
    r, _, b = diverging_rgb(-5.0, 1.0)  # clamped at the blue end
    assert b > r
    assert diverging_rgb(0.3, 0.0) == (255, 255, 255)


def test_to_dict_is_json_and_round_trips(teacher):
    model, tok = teacher
    res = inspect_response(model, tok, PROMPT, RESPONSE)
    data = json.loads(json.dumps(res.to_dict()))
    assert set(data["tokens"][0]) == {"index", "id", "text", "value", "psi", "teacher_logp", "logratio"}
    assert data["method"]["alpha"] == MethodConfig().alpha
    assert InspectResult.from_dict(data) == res
    res.tokens[0].psi = float("nan")
    assert res.to_dict()["tokens"][0]["psi"] is None  # strict JSON: no NaN


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_response(model_dirs, capsys):
    teacher = str(model_dirs["teacher"])
    rc = main(["inspect", "--teacher", teacher, "--prompt", PROMPT, "--response", RESPONSE, "--no-color"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(TOP_MARK) == 3 and "\x1b[" not in out and "Σψ" in out
    rc = main(["inspect", "--teacher", teacher, "--prompt", PROMPT, "--response", RESPONSE, "--color"])
    assert rc == 0 and "\x1b[" in capsys.readouterr().out
    rc = main(
        [
            "inspect",
            "--teacher",
            teacher,
            "--prompt",
            PROMPT,
            "--response",
            RESPONSE,
            "--json",
            "--gamma",
            "0.5",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["method"]["gamma"] == 0.5 and len(data["tokens"]) > 3


def test_cli_student_logratio_and_messages(model_dirs, capsys):
    d = {k: str(v) for k, v in model_dirs.items()}
    rc = main(
        ["inspect", "--teacher", d["teacher"], "--student", d["student"], "--reference", d["teacher"],
         "--messages", json.dumps([{"role": "user", "content": "Hi"}]), "--response", "Hello!",
         "--signal", "logratio", "--color"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "β·logratio" in out and "\x1b[" in out


def test_cli_usage_errors(model_dirs, capsys):
    teacher = str(model_dirs["teacher"])
    assert main(["inspect", "--teacher", teacher, "--prompt", "x"]) == 2
    assert (
        main(["inspect", "--teacher", teacher, "--prompt", "x", "--response", "y", "--signal", "logratio"])
        == 2
    )
    assert main(["inspect", "--teacher", teacher, "--prompt", "x", "--response", "y", "--gamma", "2"]) == 2
    err = capsys.readouterr().err
    assert "gamma" in err


def _sample(index: int) -> dict:
    def side(text: str, n: int) -> dict:
        toks = [
            {
                "text": f"t{k} ",
                "id": 10 + k,
                "logratio": 0.01 * k,
                "value": 5.0 + 0.1 * k,
                "psi": 0.1 - 0.03 * k,
                "teacher_logp": -2.0,
            }
            for k in range(n)
        ]
        return {
            "text": text,
            "tokens": toks,
            "sum_psi": sum(t["psi"] for t in toks),
            "sum_logratio": sum(t["logratio"] for t in toks),
            "value_end": 6.0,
        }

    return {"index": index, "row": 100 + index, "prompt": "Human: hi\n\nAssistant:",
            "chosen": side("good", 5), "rejected": side("bad", 4)}  # fmt: skip


def test_cli_samples(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    doc = {
        "step": 5,
        "loss_options": {"alpha": 0.7, "beta": 0.1},
        "note": None,
        "samples": [_sample(3), _sample(7)],
    }
    (run_dir / "samples.json").write_text(json.dumps(doc))
    assert main(["inspect", "--samples", str(run_dir), "--index", "7", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "step 5; alpha=0.7, beta=0.1" in out
    assert "sample 7 (row 107)" in out and "sample 3" not in out
    assert "chosen response: 5 tokens" in out and "rejected response: 4 tokens" in out
    assert out.count(TOP_MARK) == 6  # three per side
    assert (
        main(["inspect", "--samples", str(run_dir / "samples.json"), "--signal", "logratio", "--color"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("=== sample") == 2 and "\x1b[" in out
    assert main(["inspect", "--samples", str(run_dir), "--index", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["row"] == 107
    assert main(["inspect", "--samples", str(run_dir), "--index", "99"]) == 2
    assert "indices: 3, 7" in capsys.readouterr().err
    # A bare list of samples is read too.
    (tmp_path / "bare.json").write_text(json.dumps([_sample(1)]))
    assert main(["inspect", "--samples", str(tmp_path / "bare.json"), "--no-color"]) == 0
    assert "sample 1 (row 101)" in capsys.readouterr().out


@pytest.mark.slow
def test_samples_of_a_real_job_match_the_inspector(model_dirs, teacher, tmp_path, capsys):
    """A tiny job's samples.json (values from the store, on the student's tokens) renders, and
    its teacher values are what the inspector computes for the same prompt and response."""
    from tvkd.config import JobSpec, TrainConfig
    from tvkd.run_job import run_job

    rows = [
        {"prompt": f"Human: What is {a}+{a}?\n\nAssistant:", "chosen": f" The answer is {2 * a}.",
         "rejected": f" I do not know, {a}."}
        for a in range(8)
    ]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    spec = JobSpec(
        teacher=str(model_dirs["teacher"]),
        student=str(model_dirs["student"]),
        dataset=str(data),
        train=TrainConfig(max_steps=1, batch_size=2, num_samples=2, eval_fraction=0.25),
        output_dir=str(tmp_path / "run"),
        store_root=str(tmp_path / "stores"),
    )
    run_job(spec)
    assert main(["inspect", "--samples", str(tmp_path / "run"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== sample") == 2 and out.count(TOP_MARK) == 12

    doc = read_samples(tmp_path / "run")
    model, tok = teacher
    for sample in doc.samples:
        for side in ("chosen", "rejected"):
            stored = doc.result(sample, side)
            fresh = inspect_response(model, tok, sample.prompt, sample.side(side).text)
            assert [t.id for t in stored.tokens] == [t.id for t in fresh.tokens]
            assert [t.value for t in stored.tokens] == pytest.approx(
                [t.value for t in fresh.tokens], abs=1e-5
            )
            assert [t.psi for t in stored.tokens] == pytest.approx([t.psi for t in fresh.tokens], abs=1e-5)
            assert stored.value_end == pytest.approx(fresh.value_end, abs=1e-5)
