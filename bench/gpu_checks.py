"""Part (a) of bench/gpu.py: the hot paths on the device against float64 CPU references.

`tvkd_loss`, `teacher_signals` and `linear_logps` run on the device; the references are computed
in float64 on the CPU from the same (rounded) inputs, independently of tvkd where the formula is
short (MATH.md "Loss"); each check states its tolerance and passes or fails.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tvkd.logps import linear_logps
from tvkd.losses import tvkd_loss
from tvkd.values import teacher_signals


@dataclass
class Check:
    name: str
    max_abs: float
    max_rel: float
    tolerance: str
    ok: bool

    def row(self) -> list[object]:
        return [
            self.name,
            f"{self.max_abs:.2e}",
            f"{self.max_rel:.2e}",
            self.tolerance,
            "PASS" if self.ok else "FAIL",
        ]


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float) -> Check:
    got64 = got.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    diff = (got64 - ref64).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = diff / ref64.abs().clamp_min(1e-12)
    max_rel = float(rel.max()) if rel.numel() else 0.0
    ok = bool((diff <= atol + rtol * ref64.abs()).all())
    return Check(name, max_abs, max_rel, f"atol {atol:g} + rtol {rtol:g}", ok)


def _reference_teacher(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int = 128):
    """float64 V = logsumexp(z) and log π(label) on the CPU, chunked to bound host memory."""
    h64, w64 = h.double().cpu(), w.double().cpu()
    lab = labels.cpu()
    values, logps = [], []
    for s in range(0, h64.shape[0], chunk):
        z = h64[s : s + chunk] @ w64.T
        lse = torch.logsumexp(z, -1)
        values.append(lse)
        logps.append(z.gather(-1, lab[s : s + chunk, None]).squeeze(-1) - lse)
    return torch.cat(values), torch.cat(logps)


def _reference_tvkd_loss(lp_c, lp_r, ref_c, ref_r, v_c, v_r, m_c, m_r, *, alpha, beta, gamma):
    """MATH.md "Loss" written out in float64 on the CPU, independent of tvkd.losses."""

    def h(lp, ref, v, m):
        psi = gamma * v[:, 1:] - v[:, :-1]
        per_tok = beta * (lp - ref) + alpha * psi
        return torch.where(m, per_tok, torch.zeros_like(per_tok)).sum(-1)

    margin = h(lp_c, ref_c, v_c, m_c) - h(lp_r, ref_r, v_r, m_r)
    return -F.logsigmoid(margin).mean()


def run_correctness(
    device: torch.device, *, vocab: int, hidden: int, positions: int, seed: int
) -> list[Check]:
    g = torch.Generator().manual_seed(seed)
    checks: list[Check] = []
    # Logits with a realistic spread (std ≈ 2) so the logsumexp is not dominated by one entry.
    h = torch.randn(positions, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / math.sqrt(hidden))
    labels = torch.randint(0, vocab, (positions,), generator=g)
    v_ref, lp_ref = _reference_teacher(h, w, labels)

    # MATH.md property 5: the chunked float32 values equal a one-shot float64 logsumexp to 1e-5 rel.
    with _matmul_precision("highest"):
        sig = teacher_signals(h.to(device), w.to(device), labels=labels.to(device))
    checks.append(_compare("teacher values, fp32 inputs", sig.values, v_ref, atol=0.0, rtol=1e-5))
    checks.append(_compare("teacher token log-probs, fp32", sig.token_logps, lp_ref, atol=1e-4, rtol=1e-5))

    # bf16 teacher activations: teacher_signals upcasts (and on CUDA uses TF32, which holds a bf16
    # mantissa exactly), so the only error is the inputs' rounding, which the reference shares.
    hb, wb = h.bfloat16(), w.bfloat16()
    vb_ref, _ = _reference_teacher(hb.float(), wb.float(), labels)
    with _matmul_precision("highest"):
        sig_b = teacher_signals(hb.to(device), wb.to(device), labels=labels.to(device))
    checks.append(_compare("teacher values, bf16 inputs", sig_b.values, vb_ref, atol=0.0, rtol=1e-5))

    if device.type == "cuda":
        # TF32 head matmul: ~3x faster head on H100 at ~1e-3 relative logit error. Informational:
        # the tolerance says what a TF32 precompute would have to accept.
        with _matmul_precision("high"):
            sig_t = teacher_signals(h.to(device), w.to(device), labels=labels.to(device))
        checks.append(_compare("teacher values, TF32 head (info)", sig_t.values, v_ref, atol=1e-2, rtol=0.0))

    # linear_logps forward and gradients (fp32) against float64 autograd.
    n_lp = min(positions, 256)
    hl = (h[:n_lp] * 0.5).requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    gout = torch.randn(n_lp, generator=g)
    h64, w64 = hl.detach().double().requires_grad_(True), wl.detach().double().requires_grad_(True)
    lp64 = F.log_softmax(h64 @ w64.T, -1).gather(-1, labels[:n_lp, None]).squeeze(-1)
    (lp64 * gout.double()).sum().backward()
    hd, wd = hl.detach().to(device).requires_grad_(True), wl.detach().to(device).requires_grad_(True)
    with _matmul_precision("highest"):
        lp = linear_logps(hd, wd, labels[:n_lp].to(device))
        (lp * gout.to(device)).sum().backward()
    checks.append(_compare("linear_logps fwd, fp32", lp, lp64, atol=1e-4, rtol=1e-5))
    checks.append(_compare("linear_logps grad hidden, fp32", hd.grad, h64.grad, atol=1e-4, rtol=1e-4))
    checks.append(_compare("linear_logps grad head, fp32", wd.grad, w64.grad, atol=1e-4, rtol=1e-4))
    if device.type == "cuda":
        # bf16 autocast: the head matmul's output is rounded to bf16 (≈ 2^-9 relative of |z|),
        # the log-softmax itself runs in float32.
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp_b = linear_logps(hl.detach().to(device), wl.detach().to(device), labels[:n_lp].to(device))
        checks.append(_compare("linear_logps fwd, bf16 autocast", lp_b, lp64, atol=5e-2, rtol=0.0))

    # tvkd_loss on the device (float32) against the float64 formula, loss and d loss / d logps.
    b, t = 8, 512
    lens_c = torch.randint(1, t + 1, (b,), generator=g)
    lens_r = torch.randint(1, t + 1, (b,), generator=g)
    ar = torch.arange(t)
    m_c, m_r = ar[None] < lens_c[:, None], ar[None] < lens_r[:, None]
    lp_c, lp_r = -torch.rand(b, t, generator=g) * 4, -torch.rand(b, t, generator=g) * 4
    ref_c, ref_r = lp_c + 0.05 * torch.randn(b, t, generator=g), lp_r + 0.05 * torch.randn(b, t, generator=g)
    v_c, v_r = 10 + torch.randn(b, t + 1, generator=g), 10 + torch.randn(b, t + 1, generator=g)
    kw = dict(alpha=0.7, beta=0.1, gamma=0.99)
    x64 = [lp_c.double().requires_grad_(True), lp_r.double().requires_grad_(True)]
    loss64 = _reference_tvkd_loss(
        x64[0], x64[1], ref_c.double(), ref_r.double(), v_c.double(), v_r.double(), m_c, m_r, **kw
    )
    loss64.backward()
    xd = [lp_c.to(device).requires_grad_(True), lp_r.to(device).requires_grad_(True)]
    loss_d, _ = tvkd_loss(
        xd[0], xd[1], ref_c.to(device), ref_r.to(device), v_c.to(device), v_r.to(device),
        m_c.to(device), m_r.to(device), **kw,
    )  # fmt: skip
    loss_d.backward()
    checks.append(_compare("tvkd_loss value, fp32", loss_d, loss64, atol=1e-5, rtol=1e-5))
    checks.append(_compare("tvkd_loss grad chosen logps", xd[0].grad, x64[0].grad, atol=1e-6, rtol=1e-5))
    checks.append(_compare("tvkd_loss grad rejected logps", xd[1].grad, x64[1].grad, atol=1e-6, rtol=1e-5))
    return checks


@contextlib.contextmanager
def _matmul_precision(level: str):
    """Set float32 matmul precision ('highest' = true fp32, 'high' = TF32) for a block."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
