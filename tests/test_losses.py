"""MATH.md's properties of the TVKD loss, on random inputs, against a float64 reference.

The reference below is written independently of tvkd.losses: plain Python loops over rows and
tokens in float64, straight from the formulas of MATH.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from tvkd.losses import tvkd_loss

TOL = dict(rtol=1e-6, atol=1e-9)  # float32 computation vs float64 reference


def make_side(gen: torch.Generator, batch: int, max_len: int, *, dtype=torch.float64, pad_value=0.0):
    """Random per-token tensors for one side with contiguous masks of random lengths ≥ 1."""
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    policy = -torch.rand(batch, max_len, generator=gen, dtype=dtype) * 5
    ref = -torch.rand(batch, max_len, generator=gen, dtype=dtype) * 5
    values = torch.randn(batch, max_len + 1, generator=gen, dtype=dtype) * 3
    t_logps = -torch.rand(batch, max_len, generator=gen, dtype=dtype) * 4
    t_logits = torch.randn(batch, max_len, generator=gen, dtype=dtype) * 5
    for tensor in (policy, ref, t_logps, t_logits):
        tensor[~mask] = pad_value
    return dict(policy=policy, ref=ref, values=values, mask=mask, t_logps=t_logps, t_logits=t_logits)


def make_batch(seed: int, batch: int = 5, len_c: int = 7, len_r: int = 9, **kw):
    gen = torch.Generator().manual_seed(seed)
    return make_side(gen, batch, len_c, **kw), make_side(gen, batch, len_r, **kw)


def call(c: dict, r: dict, **opts):
    return tvkd_loss(
        c["policy"], r["policy"], c["ref"], r["ref"], c["values"], r["values"], c["mask"], r["mask"],
        chosen_teacher_logps=c["t_logps"], rejected_teacher_logps=r["t_logps"],
        chosen_teacher_logits=c["t_logits"], rejected_teacher_logits=r["t_logits"],
        **opts,
    )  # fmt: skip


def reference_h(side: dict, b: int, *, alpha, beta, gamma, terminal, shaping, value_beta, length_normalize,
                ended=None):  # fmt: skip
    """h(y) of MATH.md for row b, in float64 Python arithmetic (`ended[b]`: the row ends with
    its end token, for terminal="pre_eos"; None = every row)."""
    ended = [True] * side["mask"].shape[0] if ended is None else [bool(x) for x in ended]
    n = int(side["mask"][b].sum())
    v = [float(x) for x in side["values"][b]]
    total_ratio, total_psi = 0.0, 0.0
    for t in range(n):  # token t+1 of MATH.md; state s_{t+1} is v[t], s_{t+2} is v[t+1]
        total_ratio += float(side["policy"][b, t]) - float(side["ref"][b, t])
        if shaping == "value":
            v_next = v[t + 1]
            if t == n - 1 and terminal == "zero":
                v_next = 0.0
            elif t == n - 1 and terminal == "pre_eos" and ended[b]:
                v_next = v[t]  # V(s_{T+1}) := V(s_T)
            total_psi += gamma * v_next - v[t]
        elif shaping == "logprob":
            total_psi += float(side["t_logps"][b, t])
        elif shaping == "logit":
            total_psi += float(side["t_logits"][b, t]) / value_beta
    if length_normalize:
        total_ratio, total_psi = total_ratio / n, total_psi / n
    return beta * total_ratio + alpha * total_psi


def reference_nll(side: dict, b: int) -> float:
    """NLL(y) of MATH.md ("sft_weight"): mean over the row's tokens of −log π_θ."""
    n = int(side["mask"][b].sum())
    return -sum(float(side["policy"][b, t]) for t in range(n)) / n


def reference_loss(c: dict, r: dict, *, sft_weight: float = 0.0, chosen_ended=None, rejected_ended=None,
                   **opts) -> float:  # fmt: skip
    losses = []
    for b in range(c["mask"].shape[0]):
        z = reference_h(c, b, ended=chosen_ended, **opts) - reference_h(r, b, ended=rejected_ended, **opts)
        dpo = math.log1p(math.exp(-z)) if z > -30 else -z  # −log σ(z), stable
        losses.append(dpo + sft_weight * reference_nll(c, b))
    return sum(losses) / len(losses)


def reference_dpo(c: dict, r: dict, beta: float) -> float:
    opts = dict(alpha=0.0, beta=beta, gamma=1.0, terminal="model", shaping="none", value_beta=1.0,
                length_normalize=False)  # fmt: skip
    return reference_loss(c, r, **opts)


DEFAULTS = dict(alpha=0.7, beta=0.1, gamma=1.0, terminal="model", shaping="value", value_beta=1.0,
                length_normalize=False)  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"alpha": 0.3, "beta": 0.5, "gamma": 0.9},
        {"terminal": "zero", "gamma": 0.95},
        {"shaping": "logprob", "alpha": 1.2},
        {"shaping": "logit", "value_beta": 2.0},
        {"length_normalize": True},
        {"shaping": "none"},
        {"terminal": "pre_eos"},
        {"terminal": "pre_eos", "gamma": 0.9, "alpha": 1.5},
        {"sft_weight": 0.5},
        {"sft_weight": 2.0, "terminal": "pre_eos", "length_normalize": True, "beta": 0.3},
        {"sft_weight": 1.0, "alpha": 0.0},
    ],
)
def test_loss_matches_float64_reference(seed, opts):
    c, r = make_batch(seed)
    full = {**DEFAULTS, **opts}
    loss64, _ = call(c, r, **full)
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(reference_loss(c, r, **full), rel=1e-12)
    # float32 inputs: the production path, within float32 tolerance of the reference.
    c32 = {k: v.float() if v.is_floating_point() else v for k, v in c.items()}
    r32 = {k: v.float() if v.is_floating_point() else v for k, v in r.items()}
    loss32, _ = call(c32, r32, **full)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(reference_loss(c, r, **full), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_property1_alpha_zero_or_no_shaping_is_dpo(seed):
    c, r = make_batch(seed)
    dpo = reference_dpo(c, r, beta=0.1)
    for opts in ({"alpha": 0.0}, {"shaping": "none"}, {"alpha": 0.0, "shaping": "logit"}):
        loss, _ = call(c, r, **{**DEFAULTS, **opts})
        assert loss.item() == pytest.approx(dpo, rel=1e-12)
    # ...and the same number as the textbook sigmoid-DPO formula on summed log-ratios.
    logr_c = torch.where(c["mask"], c["policy"] - c["ref"], 0).sum(-1)
    logr_r = torch.where(r["mask"], r["policy"] - r["ref"], 0).sum(-1)
    textbook = -torch.nn.functional.logsigmoid(0.1 * (logr_c - logr_r)).mean()
    loss, _ = call(c, r, **{**DEFAULTS, "alpha": 0.0})
    torch.testing.assert_close(loss, textbook, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_property2_telescoping_sum(seed):
    from tvkd.values import shaping_from_values

    side = make_side(torch.Generator().manual_seed(seed), 6, 11)
    psi = shaping_from_values(side["values"], side["mask"], gamma=1.0, terminal="model")
    lengths = side["mask"].sum(-1)
    for b in range(6):
        n = int(lengths[b])
        expected = side["values"][b, n] - side["values"][b, 0]  # V(s_{T+1}) − V(s_1)
        assert psi[b].sum().item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
        assert torch.all(psi[b, n:] == 0)  # nothing beyond the row's tokens


@pytest.mark.parametrize("seed", range(5))
def test_property3_gamma_one_terminal_zero_is_dpo(seed):
    c, r = make_batch(seed)
    # Both sides start at s_1 (the shared prompt state): make V(s_1) equal as it is in real data.
    r["values"][:, 0] = c["values"][:, 0]
    loss, metrics = call(c, r, **{**DEFAULTS, "terminal": "zero", "alpha": 0.9})
    assert loss.item() == pytest.approx(reference_dpo(c, r, beta=0.1), rel=1e-12)
    assert metrics["tvkd/shaping_chosen"] == pytest.approx(metrics["tvkd/shaping_rejected"], rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_property6_gradients(seed):
    c, r = make_batch(seed)
    for side in (c, r):
        side["policy"].requires_grad_(True)
        side["values"].requires_grad_(True)
        side["t_logps"].requires_grad_(True)
        side["t_logits"].requires_grad_(True)
    for shaping in ("value", "logprob", "logit"):
        loss, _ = call(c, r, **{**DEFAULTS, "shaping": shaping})
        grads = torch.autograd.grad(
            loss,
            [c["policy"], r["policy"], c["values"], c["t_logps"], c["t_logits"]],
            allow_unused=True,
        )
        # Teacher-side tensors carry no gradient (ψ is a constant in θ).
        assert grads[2] is None and grads[3] is None and grads[4] is None
        assert grads[0] is not None and grads[1] is not None

    # Gradient w.r.t. the student's log-probs matches a central finite difference (float64).
    def f(pc, pr):
        return call({**c, "policy": pc}, {**r, "policy": pr}, **DEFAULTS)[0]

    assert torch.autograd.gradcheck(f, (c["policy"], r["policy"]), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_property7_padding_and_prompt_change_nothing(seed):
    c, r = make_batch(seed)
    base, base_metrics = call(c, r, **DEFAULTS)

    # Extra padding columns filled with garbage (including inf/nan) leave loss and metrics unchanged.
    def pad(side: dict, extra: int) -> dict:
        out = {}
        for k, v in side.items():
            if k == "mask":
                out[k] = torch.cat([v, torch.zeros(v.shape[0], extra, dtype=torch.bool)], 1)
            else:
                junk = torch.full((v.shape[0], extra), float("nan"), dtype=v.dtype)
                junk[:, ::2] = -float("inf")
                out[k] = torch.cat([v, junk], 1)
        # Garbage also inside the existing padding of each row.
        for k in ("policy", "ref", "t_logps", "t_logits"):
            out[k] = torch.where(out["mask"], out[k], torch.tensor(1e30, dtype=out[k].dtype))
        return out

    padded, padded_metrics = call(pad(c, 4), pad(r, 2), **DEFAULTS)
    # Equal up to float64 summation order over a longer (zero-filled) row: 1e-12 relative.
    assert padded.item() == pytest.approx(base.item(), rel=1e-12)
    assert padded_metrics == pytest.approx(base_metrics, rel=1e-12)
    # Prompt tokens never enter the response tensors, so the only prompt dependence is V(s_1),
    # which cancels between chosen and rejected: shifting V(s_1) equally on both sides changes nothing.
    c2, r2 = dict(c), dict(r)
    r["values"][:, 0] = c["values"][:, 0]
    base2, _ = call(c, r, **DEFAULTS)
    shift = torch.randn(c["values"].shape[0], dtype=torch.float64)
    c2["values"] = c["values"].clone()
    r2["values"] = r["values"].clone()
    c2["values"][:, 0] += shift
    r2["values"][:, 0] += shift
    shifted, _ = call(c2, r2, **DEFAULTS)
    assert shifted.item() == pytest.approx(base2.item(), rel=1e-12)


def test_metrics_definitions():
    c, r = make_batch(7, batch=8)
    loss, m = call(c, r, **{**DEFAULTS, "alpha": 0.5, "beta": 0.2})
    ratio_c = torch.where(c["mask"], c["policy"] - c["ref"], 0).sum(-1)
    ratio_r = torch.where(r["mask"], r["policy"] - r["ref"], 0).sum(-1)
    lengths_c, lengths_r = c["mask"].sum(-1), r["mask"].sum(-1)
    ar = torch.arange(8)
    sum_psi_c = c["values"][ar, lengths_c] - c["values"][:, 0]
    sum_psi_r = r["values"][ar, lengths_r] - r["values"][:, 0]
    h_c, h_r = 0.2 * ratio_c + 0.5 * sum_psi_c, 0.2 * ratio_r + 0.5 * sum_psi_r
    expected = {
        "loss": loss.item(),
        "rewards/chosen": (0.2 * ratio_c).mean().item(),
        "rewards/rejected": (0.2 * ratio_r).mean().item(),
        "rewards/margins": (0.2 * (ratio_c - ratio_r)).mean().item(),
        "rewards/accuracies": (ratio_c > ratio_r).double().mean().item(),
        "logps/chosen": torch.where(c["mask"], c["policy"], 0).sum(-1).mean().item(),
        "logps/rejected": torch.where(r["mask"], r["policy"], 0).sum(-1).mean().item(),
        "tvkd/shaping_chosen": (0.5 * sum_psi_c).mean().item(),
        "tvkd/shaping_rejected": (0.5 * sum_psi_r).mean().item(),
        "tvkd/shaping_accuracy": (sum_psi_c > sum_psi_r).double().mean().item(),
        "tvkd/shaping_ties": (sum_psi_c == sum_psi_r).double().mean().item(),
        "tvkd/shaped_accuracy": (h_c > h_r).double().mean().item(),
        "tvkd/offset": (0.5 * (sum_psi_c - sum_psi_r)).mean().item(),
        # σ(h_l − h_w) ÷ σ(β·(Δ_l − Δ_w)), mean over pairs
        "tvkd/gradient_scale": (torch.sigmoid(h_r - h_c) / torch.sigmoid(0.2 * (ratio_r - ratio_c)))
        .mean()
        .item(),
        "nll/chosen": (-torch.where(c["mask"], c["policy"], 0).sum(-1) / lengths_c).mean().item(),
    }
    assert set(m) == set(expected)
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name
    assert all(isinstance(v, float) for v in m.values())


def test_bad_inputs_name_the_argument():
    c, r = make_batch(0)
    with pytest.raises(ValueError, match="chosen_values"):
        tvkd_loss(c["policy"], r["policy"], c["ref"], r["ref"], c["values"][:, :-1], r["values"],
                  c["mask"], r["mask"])  # fmt: skip
    with pytest.raises(TypeError, match="chosen_mask"):
        tvkd_loss(c["policy"], r["policy"], c["ref"], r["ref"], c["values"], r["values"],
                  c["mask"].float(), r["mask"])  # fmt: skip
    with pytest.raises(ValueError, match="chosen_teacher_logps"):
        tvkd_loss(c["policy"], r["policy"], c["ref"], r["ref"], c["values"], r["values"],
                  c["mask"], r["mask"], shaping="logprob")  # fmt: skip
    with pytest.raises(ValueError, match="shaping"):
        call(c, r, **{**DEFAULTS, "shaping": "bogus"})
    with pytest.raises(ValueError, match="beta"):
        call(c, r, **{**DEFAULTS, "beta": 0.0})
    with pytest.raises(ValueError, match="terminal"):
        call(c, r, **{**DEFAULTS, "terminal": "end"})


# --------------------------------------------------------------------------------------------
# MATH.md property 10 (sft_weight), terminal="pre_eos", and the metrics that may be absent


@pytest.mark.parametrize("seed", range(5))
def test_property10_sft_weight_zero_changes_nothing_and_its_gradient(seed):
    c, r = make_batch(seed)
    for opts in ({}, {"terminal": "pre_eos", "shaping": "logprob"}, {"alpha": 0.0}):
        base, base_m = call(c, r, **{**DEFAULTS, **opts})
        zero, zero_m = call(c, r, **{**DEFAULTS, **opts, "sft_weight": 0.0})
        assert zero.item() == base.item()  # exactly: the term is not added at λ = 0
        assert zero_m == base_m
    # λ > 0 adds λ·NLL(y_w) per pair: the loss grows by λ·mean NLL, and only chosen log-probs
    # get the extra gradient −λ/(B·T_w) per token.
    lam = 0.7
    base, _ = call(c, r, **DEFAULTS)
    with_sft, m = call(c, r, **{**DEFAULTS, "sft_weight": lam})
    nll = [reference_nll(c, b) for b in range(c["mask"].shape[0])]
    assert with_sft.item() == pytest.approx(base.item() + lam * sum(nll) / len(nll), rel=1e-12)
    assert m["nll/chosen"] == pytest.approx(sum(nll) / len(nll), rel=1e-12)
    c["policy"].requires_grad_(True)
    r["policy"].requires_grad_(True)

    def f(pc, pr):
        return call({**c, "policy": pc}, {**r, "policy": pr}, **{**DEFAULTS, "sft_weight": lam})[0]

    # Central finite differences in float64 (gradcheck's eps 1e-6): agreement to 1e-8 absolute.
    assert torch.autograd.gradcheck(f, (c["policy"], r["policy"]), eps=1e-6, atol=1e-8)
    g_sft = torch.autograd.grad(f(c["policy"], r["policy"]), c["policy"])[0]
    g_base = torch.autograd.grad(call({**c}, {**r}, **DEFAULTS)[0], c["policy"])[0]
    extra = -lam / (c["mask"].shape[0] * c["mask"].sum(-1, keepdim=True).double())
    torch.testing.assert_close(g_sft - g_base, torch.where(c["mask"], extra, 0.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pre_eos_ends_at_the_state_before_the_end_token(seed):
    from tvkd.values import shaping_from_values

    side = make_side(torch.Generator().manual_seed(seed), 6, 11)
    lengths = side["mask"].sum(-1)
    ended = torch.tensor([True, False, True, True, False, True])
    psi = shaping_from_values(side["values"], side["mask"], gamma=1.0, terminal="pre_eos", ended=ended)
    all_ended = shaping_from_values(side["values"], side["mask"], gamma=1.0, terminal="pre_eos")
    for b in range(6):
        n = int(lengths[b])
        end = side["values"][b, n - 1] if ended[b] else side["values"][b, n]  # V(s_T) or V(s_{T+1})
        assert psi[b].sum().item() == pytest.approx((end - side["values"][b, 0]).item(), rel=1e-12, abs=1e-12)
        v_t = side["values"][b, n - 1]
        assert all_ended[b].sum().item() == pytest.approx((v_t - side["values"][b, 0]).item(), abs=1e-12)
    # With its own per-row flags, the loss matches the float64 reference.
    c, r = make_batch(seed)
    ce, re_ = torch.arange(5) % 2 == 0, torch.arange(5) % 3 == 0
    opts = {**DEFAULTS, "terminal": "pre_eos", "gamma": 0.8}
    loss, _ = call(c, r, **opts, chosen_ended=ce, rejected_ended=re_)
    want = reference_loss(c, r, **opts, chosen_ended=ce, rejected_ended=re_)
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_shaping_accuracy_is_absent_when_the_shaping_is_off_or_zero():
    c, r = make_batch(3)
    assert "tvkd/shaping_accuracy" in call(c, r, **DEFAULTS)[1]
    for opts in ({"alpha": 0.0}, {"shaping": "none"}):
        _, m = call(c, r, **{**DEFAULTS, **opts})
        assert "tvkd/shaping_accuracy" not in m and "tvkd/shaping_ties" not in m
        assert m["tvkd/offset"] == 0.0 and m["tvkd/gradient_scale"] == pytest.approx(1.0, rel=1e-12)
    # Values constant along each response: every ψ is 0 (γ = 1), so the shaping is identically zero.
    for side in (c, r):
        side["values"] = side["values"][:, :1].expand_as(side["values"]).clone()
    _, m = call(c, r, **DEFAULTS)
    assert "tvkd/shaping_accuracy" not in m and m["tvkd/offset"] == 0.0


def test_gradient_scale_stays_finite_where_the_sigmoids_underflow():
    # DPO margin β·(Δ_w − Δ_l) = 1000 and a shaping offset of 1: both σ(h_l − h_w) and
    # σ(β·(Δ_l − Δ_w)) underflow to 0 in float64 (0/0 = NaN), their ratio is e^{-1}.
    c, r = make_batch(4, batch=3)
    lengths = c["mask"].sum(-1, keepdim=True).double()
    c["ref"] = torch.where(c["mask"], c["policy"] - 10000.0 / lengths, 0.0)
    r["ref"] = r["policy"].clone()
    for side, end in ((c, 1.0 / 0.7), (r, 0.0)):
        side["values"].zero_()
        side["values"][torch.arange(3), side["mask"].sum(-1)] = end
    _, m = call(c, r, **DEFAULTS)
    assert m["rewards/margins"] == pytest.approx(1000.0, rel=1e-12)
    assert m["tvkd/offset"] == pytest.approx(1.0, rel=1e-12)
    assert m["tvkd/gradient_scale"] == pytest.approx(math.exp(-1.0), rel=1e-9)
