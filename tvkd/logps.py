"""Per-token log-probabilities log π(y_t | s_t) of a causal LM, in float32, from hidden states.

MATH.md: student log-probs are computed in float32 from the logits, by a gather on the label,
never by materialising a second full-vocabulary tensor that is not needed. We go further: only
response positions reach the LM head, and the head + log-softmax run a chunk of positions at a
time inside one autograd Function that recomputes the chunk's logits in backward. Peak memory
is then chunk × vocab instead of tokens × vocab (the usual cost of a DPO step's logits), for
one extra head matmul in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 1024


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: autocast's when autocast is on for this device."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _LinearLogps(torch.autograd.Function):
    """logp[i] = (h_i·Wᵀ + b)[y_i] − logsumexp(h_i·Wᵀ + b), chunked over i, float32 softmax."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk: int,
        dtype: torch.dtype,
    ) -> Tensor:
        n = hidden.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for reference checks
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                z = torch.nn.functional.linear(hidden[s : s + chunk].to(dtype), w, b).to(acc)
                lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
                out[s : s + chunk] = (
                    z.gather(-1, labels[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
                )
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        grad_out = grad_out.to(acc)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                z = torch.nn.functional.linear(h, w, b).to(acc)
                g_out = grad_out[s : s + chunk, None]
                # d logp / d z = onehot(y) − softmax(z); scaled by the incoming gradient.
                g = torch.exp(z - lse[s : s + chunk, None]).mul_(-g_out)
                g.scatter_add_(-1, labels[s : s + chunk, None], g_out)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (g.T @ h).to(acc)
                if grad_b is not None:
                    grad_b += g.to(acc).sum(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def linear_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """log π(labels | hidden) for hidden [N, H], LM head weight [V, H], labels [N] → float32 [N]
    (float64 when the inputs are float64).

    Differentiable in hidden, weight and bias. Under autocast the head matmul runs in the
    autocast dtype; the log-softmax is always float32.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H] and labels [N]; got {tuple(hidden.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return _LinearLogps.apply(hidden, weight, bias, labels, chunk_size, _compute_dtype(hidden))


def logits_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(labels | ·) from logits [..., V] → float32 [...] (float64 stays float64); the plain,
    unfused path, used as a reference."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def response_positions(attention_mask: Tensor, prompt_lengths: Tensor, response_lengths: Tensor) -> Tensor:
    """Bool [B, L] marking the positions whose next-token logits predict a response token.

    Rows are laid out prompt ⊕ response ⊕ padding (right padding). The logits at position i predict
    token i+1, so response token t (0-based) of row b is predicted at position P_b − 1 + t.
    """
    length = attention_mask.shape[1]
    pos = torch.arange(length, device=attention_mask.device).unsqueeze(0)
    start = (prompt_lengths - 1).unsqueeze(1)
    return (pos >= start) & (pos < start + response_lengths.unsqueeze(1))
