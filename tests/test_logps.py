"""The fused, chunked LM-head log-probabilities against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from tvkd.logps import linear_logps, logits_logps, response_positions


def _inputs(seed: int, n: int = 41, h: int = 24, v: int = 300, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype) * 0.5
    bias = torch.randn(v, generator=gen, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_forward_and_gradients_match_float64_reference(chunk):
    hidden, weight, bias, labels = _inputs(0)
    hidden.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True)
    got = linear_logps(hidden, weight, labels, bias, chunk_size=chunk)
    want = logits_logps(torch.nn.functional.linear(hidden, weight, bias).double(), labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The hand-written backward against finite differences (small sizes: gradcheck is O(inputs)).
    h, w, b, y = _inputs(5, n=9, h=5, v=30)
    h.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_logps(h, w, y, b, chunk_size=chunk), (h, w, b))


def test_float32_path_within_tolerance_and_grads_match_autograd():
    h64, w64, _, labels = _inputs(1)
    h32, w32 = h64.float().requires_grad_(True), w64.float().requires_grad_(True)
    got = linear_logps(h32, w32, labels, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), logits_logps(h64 @ w64.T, labels), rtol=1e-5, atol=1e-5)
    weights = torch.randn(got.shape[0])
    (got * weights).sum().backward()
    h_ref, w_ref = h64.clone().requires_grad_(True), w64.clone().requires_grad_(True)
    (logits_logps(h_ref @ w_ref.T, labels) * weights.double()).sum().backward()
    torch.testing.assert_close(h32.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_float32_log_softmax():
    h64, w64, _, labels = _inputs(2, v=2000)
    h32, w32 = h64.float().requires_grad_(True), w64.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_logps(h32, w32, labels, chunk_size=16)
    assert got.dtype == torch.float32
    # Reference: the same bf16-rounded matmul inputs, then an exact float64 log-softmax.
    z = h64.bfloat16().double() @ w64.bfloat16().double().T
    torch.testing.assert_close(got.double(), logits_logps(z, labels), rtol=0, atol=0.05)
    got.sum().backward()
    assert h32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32


def test_response_positions():
    attn = torch.ones(2, 8, dtype=torch.long)
    pos = response_positions(attn, torch.tensor([3, 1]), torch.tensor([2, 4]))
    # Row 0: prompt of 3, response tokens at 3,4 → predicted at positions 2,3.
    assert pos[0].nonzero().flatten().tolist() == [2, 3]
    assert pos[1].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_empty_input():
    out = linear_logps(torch.zeros(0, 4), torch.zeros(10, 4), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
