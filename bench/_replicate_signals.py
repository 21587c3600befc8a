"""Teacher signals of bench/replicate.py: values per source, the per-method value tensors, and
the teacher's shaping accuracy. Values come from the library (`tvkd.values`: `soft_values`,
`implicit_values`, `shaping_from_values`); this file only arranges them per response."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from _replicate_model import PrefData, Seqs, _device, response_logps, teacher_values
from torch import Tensor, nn

from tvkd import taskworld as tw
from tvkd.losses import tvkd_loss


def teacher_signals(teachers: dict[str, Any], pairs: Sequence[tw.Pair], *, beta: float) -> dict[str, Any]:
    """Every teacher signal on the student's training pairs (CPU tensors, computed once).

    For each teacher ("dpo", "sft"): V_φ from its logits (`q_source="logits"`, β_v 1) at the
    T+1 states of each response, and its token log-probs. "implicit": the DPO teacher's implicit
    reward as a potential, with the SFT teacher as its `teacher_reference` and β_v = the DPO β.
    """
    device = _device(teachers["dpo"])
    sides = {
        "c": Seqs.build([(p.prompt, p.chosen) for p in pairs], device),
        "r": Seqs.build([(p.prompt, p.rejected) for p in pairs], device),
    }
    out: dict[str, Any] = {}
    for name in ("dpo", "sft"):
        for side, seqs in sides.items():
            values, logps = teacher_values(teachers[name], seqs)
            out[f"{name}_values_{side}"], out[f"{name}_logps_{side}"] = values.cpu(), logps.cpu()
    for side, seqs in sides.items():
        _, mask = seqs.positions()
        out[f"mask_{side}"] = mask.cpu()
        try:
            out[f"implicit_values_{side}"] = implicit_potential(
                out[f"dpo_logps_{side}"], out[f"sft_logps_{side}"], mask.cpu(), value_beta=beta
            )
        except NotImplementedError as e:
            out["missing"] = str(e)
    return out


def implicit_potential(teacher_logps: Tensor, reference_logps: Tensor, mask: Tensor, *, value_beta: float):
    """V [N, T+1] of `q_source="implicit"`, response by response, by the library's
    `tvkd.values.implicit_values` (MATH.md "Teacher soft value"); zeros past each response."""
    from tvkd import values as tv

    fn = getattr(tv, "implicit_values", None)
    if fn is None:
        raise NotImplementedError(MISSING["implicit"])
    out = torch.zeros(mask.shape[0], mask.shape[1] + 1)
    for i, n in enumerate(mask.sum(-1).tolist()):
        out[i, : n + 1] = fn(teacher_logps[i, :n], reference_logps[i, :n], value_beta)
    return out


MISSING = {
    "implicit": "q_source='implicit' (tvkd.values.implicit_values) is not in the library yet",
    "pre_eos": "terminal='pre_eos' is not in the library yet",
    "sft_weight": "tvkd_loss(sft_weight=) is not in the library yet",
}


def missing_feature(method: Any) -> str | None:
    """Why the library cannot run `method` yet (a feature of MATH.md not landed), or None."""
    import inspect

    from tvkd import values as tv
    from tvkd.config import TERMINALS

    if method.q_source == "implicit" and not hasattr(tv, "implicit_values"):
        return MISSING["implicit"]
    if method.terminal not in TERMINALS:
        return MISSING["pre_eos"]
    if method.sft_weight and method.dpo and "sft_weight" not in inspect.signature(tvkd_loss).parameters:
        return MISSING["sft_weight"]
    return None


def pref_data(
    model: nn.Module,
    pairs: Sequence[tw.Pair],
    *,
    signals: dict[str, Any] | None = None,
    method: Any = None,
    seed: int = 0,
) -> PrefData:
    """The preference set for `method` (None: plain DPO) with π_ref = `model` as it is now."""
    device = _device(model)
    chosen = Seqs.build([(p.prompt, p.chosen) for p in pairs], device)
    rejected = Seqs.build([(p.prompt, p.rejected) for p in pairs], device)
    ref_c, ref_r = response_logps(model, chosen), response_logps(model, rejected)
    data = PrefData(
        chosen,
        rejected,
        ref_c,
        ref_r,
        torch.zeros(len(pairs), ref_c.shape[1] + 1, device=device),
        torch.zeros(len(pairs), ref_r.shape[1] + 1, device=device),
    )
    if method is None or method.shaping == "none":
        return data
    if signals is None:
        raise ValueError(f"method {method.name!r} needs the teacher's signals")
    if method.shaping == "logprob":
        data.teacher_logps_chosen = signals[f"{method.teacher}_logps_c"].to(device)
        data.teacher_logps_rejected = signals[f"{method.teacher}_logps_r"].to(device)
        return data
    key = "implicit" if method.q_source == "implicit" else method.teacher
    v_c, v_r = signals[f"{key}_values_c"].clone(), signals[f"{key}_values_r"].clone()
    if method.noise:
        v_c, v_r = add_noise(v_c, v_r, signals, method.noise, seed)
    data.values_chosen, data.values_rejected = v_c.to(device), v_r.to(device)
    return data


def response_sums(values: Tensor, mask: Tensor, *, terminal: str = "model") -> Tensor:
    """Σ_t ψ_t per response with γ = 1 (the library's `shaping_from_values`)."""
    from tvkd.values import shaping_from_values

    return shaping_from_values(values, mask, gamma=1.0, terminal=terminal).sum(-1)


def add_noise(v_c: Tensor, v_r: Tensor, signals: dict[str, Any], level: float, seed: int):
    """V + Gaussian noise at every state after the prompt (s_1 stays clean: chosen and rejected
    share it), with σ = level · std(clean offset) / √2, so that the per-pair offset Σψ(y_w) −
    Σψ(y_l) (γ = 1) gets noise of `level` times its own spread. Still a potential."""
    offset = response_sums(v_c, signals["mask_c"]) - response_sums(v_r, signals["mask_r"])
    sigma = level * float(offset.std()) / math.sqrt(2)
    gen = torch.Generator().manual_seed(77_000 + seed)
    for v in (v_c, v_r):
        v[:, 1:] += sigma * torch.randn(v[:, 1:].shape, generator=gen)
    return v_c, v_r


SOURCES = (
    # (label, teacher, values key or None for the log-likelihood, terminal)
    ("V after EOS (logits, terminal=model; the default)", "dpo", "dpo", "model"),
    ("V where EOS is predicted (terminal=pre_eos)", "dpo", "dpo", "pre_eos"),
    ("implicit reward (q_source=implicit)", "dpo", "implicit", "model"),
    ("log-likelihood Σ log π_φ (shaping=logprob)", "dpo", None, "model"),
    ("weak teacher: V after EOS", "sft", "sft", "model"),
    ("weak teacher: V at pre_eos", "sft", "sft", "pre_eos"),
    ("weak teacher: log-likelihood", "sft", None, "model"),
)


def shaping_accuracy(signals: dict[str, Any], pairs: Sequence[tw.Pair]) -> list[dict[str, Any]]:
    """Per value source: how many training pairs have Σψ(y_w) > Σψ(y_l) (γ = 1), and ties.

    A source the library does not offer yet is reported with `error` instead of figures.
    """
    rows = []
    for label, teacher, key, terminal in SOURCES:
        try:
            if key is None:
                s_c = signals[f"{teacher}_logps_c"].sum(-1)
                s_r = signals[f"{teacher}_logps_r"].sum(-1)
            else:
                s_c = response_sums(signals[f"{key}_values_c"], signals["mask_c"], terminal=terminal)
                s_r = response_sums(signals[f"{key}_values_r"], signals["mask_r"], terminal=terminal)
        except (KeyError, ValueError) as e:
            rows.append({"source": label, "error": str(e)})
            continue
        right = int((s_c > s_r).sum())
        ties = int((s_c == s_r).sum())
        kinds = {}
        for kind in ("procedure", "corruption"):
            sel = torch.tensor([p.kind == kind for p in pairs])
            kinds[kind] = float((s_c[sel] > s_r[sel]).float().mean()) if bool(sel.any()) else math.nan
        rows.append({"source": label, "right": right, "ties": ties, "n": len(pairs), "by_kind": kinds})
    return rows
