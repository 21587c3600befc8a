"""Teacher soft values, shaping and the cross-tokenizer mapping (MATH.md properties 2, 4, 5, 8)."""

from __future__ import annotations

import pytest
import torch

from tvkd.values import map_boundary_values, shaping_from_values, soft_values, teacher_signals


def reference_values(logits64: torch.Tensor, q_source: str, value_beta: float) -> torch.Tensor:
    """One-shot float64 V of MATH.md."""
    q = logits64 if q_source == "logits" else logits64 - torch.logsumexp(logits64, -1, keepdim=True)
    return value_beta * torch.logsumexp(q / value_beta, -1)


@pytest.mark.parametrize("q_source", ["logits", "logprobs"])
@pytest.mark.parametrize("value_beta", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_property5_chunked_equals_one_shot_float64(q_source, value_beta, chunk):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 13, 5000, generator=gen) * 8 + 20  # large offsets stress the logsumexp
    got = soft_values(logits, q_source=q_source, value_beta=value_beta, chunk_size=chunk)
    want = reference_values(logits.double(), q_source, value_beta)
    assert got.dtype == torch.float32 and got.shape == (3, 13)
    if q_source == "logprobs" and value_beta == 1.0:
        assert torch.all(got == 0)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_bf16_logits_are_upcast_before_the_logsumexp():
    logits = torch.randn(40, 3000, generator=torch.Generator().manual_seed(1)) * 5
    bf = logits.bfloat16()
    got = soft_values(bf, chunk_size=8)
    want = reference_values(bf.double(), "logits", 1.0)  # exact value of the bf16 inputs
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_property4_logprobs_at_beta_one_is_exactly_zero():
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(50, 32, generator=gen), torch.randn(700, 32, generator=gen)
    out = teacher_signals(hidden, weight, q_source="logprobs", value_beta=1.0, chunk_size=9)
    assert torch.all(out.values == 0)
    assert torch.all(soft_values(torch.randn(4, 9, 100), q_source="logprobs") == 0)


@pytest.mark.parametrize("q_source", ["logits", "logprobs"])
@pytest.mark.parametrize("value_beta", [1.0, 0.7])
def test_teacher_signals_from_hidden_match_float64_reference(q_source, value_beta):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 48, generator=gen)
    weight, bias = torch.randn(900, 48, generator=gen) * 0.3, torch.randn(900, generator=gen)
    labels = torch.randint(0, 900, (37,), generator=gen)
    out = teacher_signals(hidden, weight, bias, labels=labels, q_source=q_source, value_beta=value_beta,
                          topk=5, chunk_size=8)  # fmt: skip
    z = hidden.double() @ weight.double().T + bias.double()
    want_v = reference_values(z, q_source, value_beta)
    torch.testing.assert_close(out.values.double(), want_v, rtol=1e-5, atol=1e-5)
    want_lp = z.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(out.token_logps.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.token_logits.double(), z.gather(-1, labels[:, None]).squeeze(-1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    want_top = z.topk(5, -1)
    torch.testing.assert_close(out.topk_logits.double(), want_top.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.topk_ids, want_top.indices)


def test_softcap_is_applied_before_the_values():
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(10, 16, generator=gen) * 5, torch.randn(200, 16, generator=gen)
    out = teacher_signals(hidden, weight, softcap=30.0)
    z = hidden.double() @ weight.double().T
    z = 30.0 * torch.tanh(z / 30.0)
    torch.testing.assert_close(out.values.double(), torch.logsumexp(z, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_shaping_terminal_modes(gamma):
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0, 99.0], [3.0, 5.0, 99.0, 99.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    psi = shaping_from_values(values, mask, gamma=gamma, terminal="model")
    want = torch.tensor([[gamma * 2 - 1, gamma * 4 - 2, gamma * 8 - 4, 0], [gamma * 5 - 3, 0, 0, 0]],
                        dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(psi, want)
    psi0 = shaping_from_values(values, mask, gamma=gamma, terminal="zero")
    want[0, 2], want[1, 0] = -4.0, -3.0  # V(s_{T+1}) := 0
    torch.testing.assert_close(psi0, want)


def _random_ends(gen: torch.Generator, n_chars: int, n_tokens: int, trailing_eos: bool) -> list[int]:
    """Non-decreasing token end offsets over a content of n_chars characters."""
    cuts = torch.randperm(max(n_chars - 1, 1), generator=gen)[: n_tokens - 1] + 1
    ends = [*sorted(int(c) for c in cuts.clamp(max=n_chars)), n_chars]
    return [*ends, n_chars] if trailing_eos else ends


@pytest.mark.parametrize("seed", range(20))
def test_property8_cross_tokenizer_sum_is_teacher_sum(seed):
    gen = torch.Generator().manual_seed(seed)
    n_chars = int(torch.randint(5, 60, (1,), generator=gen))
    t_ends = _random_ends(gen, n_chars, int(torch.randint(1, n_chars + 1, (1,), generator=gen)), True)
    s_ends = _random_ends(gen, n_chars, int(torch.randint(1, n_chars + 1, (1,), generator=gen)), True)
    t_values = torch.randn(len(t_ends) + 1, generator=gen, dtype=torch.float64)
    mapped = map_boundary_values(t_values, t_ends, s_ends)
    assert mapped.shape == (len(s_ends) + 1,)
    mask = torch.ones(1, len(s_ends), dtype=torch.bool)
    psi_student = shaping_from_values(mapped[None].double(), mask, gamma=1.0)
    teacher_sum = float(t_values[-1] - t_values[0])  # V(end) − V(prompt end), teacher side
    assert psi_student.sum().item() == pytest.approx(teacher_sum, rel=1e-6, abs=1e-6)
    # Every mapped potential is a teacher value at a boundary at or before the student boundary.
    s_pos = [0, *s_ends[:-1]]
    t_pos = [0, *t_ends[:-1]]
    for k, pos in enumerate(s_pos):
        j = 0 if k == 0 else max(i for i, p in enumerate(t_pos) if p <= pos)
        assert mapped[k].item() == pytest.approx(float(t_values[j]), rel=1e-6)


def test_property8_identical_tokenizations_are_the_identity():
    values = torch.randn(6, dtype=torch.float64)
    ends = [2, 5, 5, 9, 9]
    assert torch.equal(map_boundary_values(values, ends, ends), values.float())


def test_mapping_example_coarser_and_finer_student():
    # Content "abcdef": teacher tokens "ab","cd","ef",EOS; values V0..V4.
    t_vals = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    t_ends = [2, 4, 6, 6]
    # Coarser student: "abcd","ef",EOS → boundaries at 0, 4, 6, end.
    assert map_boundary_values(t_vals, t_ends, [4, 6, 6]).tolist() == [10.0, 12.0, 13.0, 14.0]
    # Finer student: "a","b","c",... EOS → 0,1,2,3,4,5,6,end → latest teacher boundary at or before.
    got = map_boundary_values(t_vals, t_ends, [1, 2, 3, 4, 5, 6, 6]).tolist()
    assert got == [10.0, 10.0, 11.0, 11.0, 12.0, 12.0, 13.0, 14.0]
