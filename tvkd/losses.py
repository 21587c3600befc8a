"""The TVKD loss of MATH.md, from per-token tensors.

    h(y) = Σ_t [ β·(log π_θ(y_t|s_t) − log π_ref(y_t|s_t)) + α·ψ_t ]
    L    = − log σ( h(y_w) − h(y_l) ) + λ·NLL(y_w),   averaged over the pairs of the batch

(λ = `sft_weight`, default 0; NLL(y_w) = mean over the chosen tokens of −log π_θ.)

`tvkd_loss` is the public entry point: drop it into any training loop that can produce
per-response-token log-probabilities. ψ is a constant with respect to θ (teacher tensors are
detached), so the loss costs one student forward/backward per step on top of the precompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tvkd.config import SHAPINGS, MethodConfig
from tvkd.values import shaping_from_values


@dataclass
class PairTerms:
    """Per-pair sums that the loss and every metric are made of (each [B])."""

    logratio_chosen: Tensor  # Σ_t (log π_θ − log π_ref) over y_w (÷T if length_normalize)
    logratio_rejected: Tensor
    shaping_chosen: Tensor  # Σ_t ψ_t over y_w (÷T if length_normalize); constant in θ
    shaping_rejected: Tensor
    logps_chosen: Tensor  # Σ_t log π_θ over y_w (never normalised; a TRL-style metric)
    logps_rejected: Tensor
    tokens_chosen: Tensor  # T of y_w (the NLL term and `nll/chosen` are means over its tokens)


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not x*mask: padding may hold -inf/NaN and must not leak (MATH.md property 7).
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1)


def _check_side(name: str, logps: Tensor, ref: Tensor, values: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}_mask must be a bool tensor; got {mask.dtype}")
    if logps.shape != mask.shape or ref.shape != mask.shape:
        raise ValueError(
            f"policy_{name}_logps {tuple(logps.shape)}, ref_{name}_logps {tuple(ref.shape)} and "
            f"{name}_mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
    if values.shape != (mask.shape[0], mask.shape[1] + 1):
        raise ValueError(
            f"{name}_values must be [B, T+1] = {(mask.shape[0], mask.shape[1] + 1)}; "
            f"got {tuple(values.shape)}"
        )


def shaping_terms(
    mode: str,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    terminal: str,
    teacher_logps: Tensor | None,
    teacher_logits: Tensor | None,
    value_beta: float,
    side: str = "chosen",
    ended: Tensor | None = None,
) -> Tensor:
    """ψ_t per token for one side, by shaping mode (MATH.md "Shaping modes"); zero off the mask.
    `ended` [B] bool: which responses end with their end token (terminal="pre_eos"; None = all)."""
    if mode == "value":
        return shaping_from_values(values, mask, gamma=gamma, terminal=terminal, ended=ended)
    if mode == "logprob":
        if teacher_logps is None:
            raise ValueError(f"shaping='logprob' needs {side}_teacher_logps (precompute token_stats=True)")
        psi = teacher_logps.detach()
    elif mode == "logit":
        if teacher_logits is None:
            raise ValueError(f"shaping='logit' needs {side}_teacher_logits (precompute token_stats=True)")
        psi = teacher_logits.detach() / value_beta
    elif mode == "none":
        psi = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)
    else:
        raise ValueError(f"shaping must be one of {SHAPINGS}; got {mode!r}")
    if psi.shape != mask.shape:
        raise ValueError(
            f"{side} teacher token tensor must be [B, T] = {tuple(mask.shape)}; got {tuple(psi.shape)}"
        )
    return torch.where(mask, psi, torch.zeros_like(psi))


def pair_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_values: Tensor,
    rejected_values: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    gamma: float = 1.0,
    terminal: str = "model",
    shaping: str = "value",
    chosen_teacher_logps: Tensor | None = None,
    rejected_teacher_logps: Tensor | None = None,
    chosen_teacher_logits: Tensor | None = None,
    rejected_teacher_logits: Tensor | None = None,
    value_beta: float = 1.0,
    length_normalize: bool = False,
    chosen_ended: Tensor | None = None,
    rejected_ended: Tensor | None = None,
) -> PairTerms:
    """The per-pair sums behind the loss (same arguments as `tvkd_loss`, without α/β/λ)."""
    _check_side("chosen", policy_chosen_logps, ref_chosen_logps, chosen_values, chosen_mask)
    _check_side("rejected", policy_rejected_logps, ref_rejected_logps, rejected_values, rejected_mask)
    if chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError("chosen and rejected must have the same batch size")
    # Sums in at least float32 whatever the inputs (float64 stays float64 for reference checks).
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)

    def side(logps: Tensor, ref: Tensor, values: Tensor, mask: Tensor, t_lp, t_lg, ended, name: str):
        psi = shaping_terms(
            shaping,
            values.to(dtype),
            mask,
            gamma=gamma,
            terminal=terminal,
            teacher_logps=None if t_lp is None else t_lp.to(dtype),
            teacher_logits=None if t_lg is None else t_lg.to(dtype),
            value_beta=value_beta,
            side=name,
            ended=ended,
        )
        logps = logps.to(dtype)
        logratio = _masked_sum(logps - ref.to(dtype), mask)
        shaping_sum = _masked_sum(psi, mask)
        if length_normalize:
            n = mask.sum(-1).clamp(min=1).to(dtype)
            logratio, shaping_sum = logratio / n, shaping_sum / n
        return logratio, shaping_sum, _masked_sum(logps, mask)

    lr_c, sh_c, lp_c = side(
        policy_chosen_logps,
        ref_chosen_logps,
        chosen_values,
        chosen_mask,
        chosen_teacher_logps,
        chosen_teacher_logits,
        chosen_ended,
        "chosen",
    )
    lr_r, sh_r, lp_r = side(
        policy_rejected_logps,
        ref_rejected_logps,
        rejected_values,
        rejected_mask,
        rejected_teacher_logps,
        rejected_teacher_logits,
        rejected_ended,
        "rejected",
    )
    return PairTerms(lr_c, lr_r, sh_c, sh_r, lp_c, lp_r, chosen_mask.sum(-1).to(dtype))


def loss_and_metrics(
    terms: PairTerms, *, alpha: float, beta: float, sft_weight: float = 0.0
) -> tuple[Tensor, dict[str, float]]:
    """L = mean over pairs of [−log σ(h_w − h_l) + λ·NLL(y_w)] and the MATH.md metrics.

    `tvkd/shaping_accuracy` and `tvkd/shaping_ties` are absent from the dict when the shaping is
    off (α = 0) or identically zero on these pairs (every Σψ is 0); every other metric is always
    there. `tvkd/gradient_scale` = mean σ(h_l − h_w) / σ(β·(Δ_l − Δ_w)), formed as the exp of a
    difference of log-sigmoids so that it stays finite where both sigmoids underflow.
    """
    h_chosen = beta * terms.logratio_chosen + alpha * terms.shaping_chosen
    h_rejected = beta * terms.logratio_rejected + alpha * terms.shaping_rejected
    margin = h_chosen - h_rejected
    per_pair = -F.logsigmoid(margin)
    nll = -terms.logps_chosen / terms.tokens_chosen.clamp(min=1)
    if sft_weight:  # exactly the DPO/TVKD loss at λ = 0 (MATH.md property 10)
        per_pair = per_pair + sft_weight * nll
    loss = per_pair.mean()

    with torch.no_grad():
        r_c, r_r = beta * terms.logratio_chosen, beta * terms.logratio_rejected
        s_c, s_r = alpha * terms.shaping_chosen, alpha * terms.shaping_rejected
        dtype = r_c.dtype
        raw_c, raw_r = terms.shaping_chosen, terms.shaping_rejected
        shaping_on = alpha > 0 and bool(((raw_c != 0) | (raw_r != 0)).any())
        grad_scale = torch.exp(F.logsigmoid(-margin) - F.logsigmoid(-(r_c - r_r)))
        stats = torch.stack(
            [
                loss.detach(),
                r_c.mean(),
                r_r.mean(),
                (r_c - r_r).mean(),
                (r_c > r_r).to(dtype).mean(),
                terms.logps_chosen.mean(),
                terms.logps_rejected.mean(),
                s_c.mean(),
                s_r.mean(),
                (raw_c > raw_r).to(dtype).mean(),
                (raw_c == raw_r).to(dtype).mean(),
                (h_chosen > h_rejected).to(dtype).mean(),
                (s_c - s_r).mean(),
                grad_scale.mean(),
                nll.detach().mean(),
            ]
        )
        values = stats.double().tolist()  # one device sync for every metric
    metrics = dict(zip(_METRIC_NAMES, values, strict=True))
    if not shaping_on:
        del metrics["tvkd/shaping_accuracy"], metrics["tvkd/shaping_ties"]
    return loss, metrics


_METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "tvkd/shaping_chosen",
    "tvkd/shaping_rejected",
    "tvkd/shaping_accuracy",
    "tvkd/shaping_ties",
    "tvkd/shaped_accuracy",
    "tvkd/offset",
    "tvkd/gradient_scale",
    "nll/chosen",
)


def tvkd_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_values: Tensor,
    rejected_values: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    alpha: float = 0.7,
    beta: float = 0.1,
    gamma: float = 1.0,
    terminal: str = "model",
    shaping: str = "value",
    chosen_teacher_logps: Tensor | None = None,
    rejected_teacher_logps: Tensor | None = None,
    chosen_teacher_logits: Tensor | None = None,
    rejected_teacher_logits: Tensor | None = None,
    value_beta: float = 1.0,
    length_normalize: bool = False,
    sft_weight: float = 0.0,
    chosen_ended: Tensor | None = None,
    rejected_ended: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """TVKD loss (MATH.md "Loss") and its metrics.

    Shapes: log-prob tensors [B, T] over response tokens only (row b's tokens at 0..T_b−1);
    masks bool [B, T], True on the row's tokens, contiguous from 0; chosen and rejected may have
    different T. Values [B, T+1]: index t−1 holds V(s_t), index T_b the terminal V(s_{T_b+1}).
    `*_teacher_logps` / `*_teacher_logits` [B, T] feed the 'logprob' / 'logit' shaping modes.
    `*_ended` [B] bool: rows whose response ends with its end-of-response token, for
    terminal="pre_eos" (None = every row, as `tvkd.tokenize.tokenize_pair` makes them).
    `sft_weight` λ ≥ 0 adds λ·NLL(y_w) (mean −log π_θ over the chosen tokens) per pair.
    Returns (scalar loss, metrics dict of floats named as in MATH.md "Metrics"; see
    `loss_and_metrics` for the ones that may be absent).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0; got {alpha}")
    if not sft_weight >= 0:
        raise ValueError(f"sft_weight must be >= 0; got {sft_weight}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    terms = pair_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_values,
        rejected_values,
        chosen_mask,
        rejected_mask,
        gamma=gamma,
        terminal=terminal,
        shaping=shaping,
        chosen_teacher_logps=chosen_teacher_logps,
        rejected_teacher_logps=rejected_teacher_logps,
        chosen_teacher_logits=chosen_teacher_logits,
        rejected_teacher_logits=rejected_teacher_logits,
        value_beta=value_beta,
        length_normalize=length_normalize,
        chosen_ended=chosen_ended,
        rejected_ended=rejected_ended,
    )
    return loss_and_metrics(terms, alpha=alpha, beta=beta, sft_weight=sft_weight)


def loss_options(method: MethodConfig, *, shaping: str | None = None) -> dict[str, Any]:
    """The keyword options of `tvkd_loss` (and `pair_terms`, less α/β) for a method; `shaping`
    overrides the method's (e.g. "none" when no value store is used)."""
    return {
        "alpha": method.alpha,
        "beta": method.beta,
        "gamma": method.gamma,
        "terminal": method.terminal,
        "shaping": shaping or method.shaping,
        "value_beta": method.value_beta,
        "length_normalize": method.length_normalize,
        "sft_weight": method.sft_weight,
    }
