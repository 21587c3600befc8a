"""Models, batches, training loops and the gold evaluation of bench/replicate.py.

The models are tiny character-level GPTs (pre-LayerNorm, learned positions, causal attention),
built and trained in-process on the task world of `tvkd.taskworld`: nothing is downloaded. Every
preference objective (DPO, TVKD and its variants) is the library's `tvkd.losses.tvkd_loss`; the
teacher's soft values are `tvkd.values.soft_values`; the shaping options (`gamma`, `terminal`,
`shaping`, `q_source`) are the library's. This file only builds tensors for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvkd import taskworld as tw
from tvkd.losses import tvkd_loss
from tvkd.values import soft_values

MAX_LEN = 24  # BOS + prompt (≤ 9) + answer (≤ 7) + EOS, with room


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Causal LM over the task world's characters: ids [B, L] → logits [B, L, VOCAB_SIZE]."""

    def __init__(self, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(tw.VOCAB_SIZE, d_model)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, tw.VOCAB_SIZE, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Seqs:
    """Right-padded sequences BOS + prompt + response + EOS and where their responses are.

    ids [N, L]; start [N]: index of the last prompt token (its logits predict response token 1);
    length [N]: T, response tokens counting EOS.
    """

    ids: Tensor
    start: Tensor
    length: Tensor

    @staticmethod
    def build(rows: Sequence[tuple[str, str]], device: torch.device | str = "cpu") -> Seqs:
        encoded = [tw.sequence(p, r) for p, r in rows]
        width = max(len(ids) for ids, _ in encoded)
        if width > MAX_LEN:
            raise ValueError(f"a sequence has {width} tokens; the models take at most {MAX_LEN}")
        ids = torch.full((len(rows), width), tw.PAD, dtype=torch.long)
        for i, (row, _) in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(row)
        start = torch.tensor([n - 1 for _, n in encoded])
        length = torch.tensor([len(row) - n for row, n in encoded])
        return Seqs(ids.to(device), start.to(device), length.to(device))

    def take(self, idx: Tensor) -> Seqs:
        idx = idx.to(self.ids.device)
        width = int((self.start[idx] + self.length[idx] + 1).max())
        return Seqs(self.ids[idx, :width], self.start[idx], self.length[idx])

    def positions(self, extra: int = 0) -> tuple[Tensor, Tensor]:
        """Gather index [N, T+extra] of the positions start..start+T−1+extra, and the mask of
        the T (+extra) real ones."""
        t_max = int(self.length.max()) + extra
        steps = torch.arange(t_max, device=self.ids.device).unsqueeze(0)
        pos = self.start.unsqueeze(1) + steps
        mask = steps < (self.length + extra).unsqueeze(1)
        return pos.clamp(max=self.ids.shape[1] - 1), mask


def token_logps(logits: Tensor, seqs: Seqs) -> tuple[Tensor, Tensor]:
    """log π(y_t | s_t) of the response tokens [N, T] (float32) and their bool mask [N, T]."""
    pos, mask = seqs.positions()
    labels = seqs.ids.gather(1, (pos + 1).clamp(max=seqs.ids.shape[1] - 1))
    picked = logits.float().gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logps = picked.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


@torch.no_grad()
def teacher_values(model: nn.Module, seqs: Seqs, *, q_source: str = "logits", value_beta: float = 1.0):
    """V_φ(s_1..s_{T+1}) [N, T+1] (the library's soft values of the logits at those states) and
    the teacher's token log-probs [N, T], in batches of 512."""
    values, logps = [], []
    for i in range(0, len(seqs.ids), 512):
        part = seqs.take(torch.arange(i, min(i + 512, len(seqs.ids))))
        logits = model(part.ids)
        pos, mask = part.positions(extra=1)
        at = logits.float().gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        v = soft_values(at, q_source=q_source, value_beta=value_beta)
        values.append(torch.where(mask, v, torch.zeros_like(v)))
        logps.append(token_logps(logits, part)[0])
    return _cat_padded(values), _cat_padded(logps)


@torch.no_grad()
def response_logps(model: nn.Module, seqs: Seqs) -> Tensor:
    """log π(y_t | s_t) [N, T] of every sequence's response, in batches of 512 (no gradient)."""
    out = []
    for i in range(0, len(seqs.ids), 512):
        part = seqs.take(torch.arange(i, min(i + 512, len(seqs.ids))))
        out.append(token_logps(model(part.ids), part)[0])
    return _cat_padded(out)


def _cat_padded(parts: list[Tensor]) -> Tensor:
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sft(
    model: nn.Module, rows: Sequence[tuple[str, str]], *, steps: int, lr: float, batch: int, seed: int
) -> None:
    """Supervised fine-tuning: mean NLL of the response tokens (EOS included), AdamW, cosine."""
    seqs = Seqs.build(rows, _device(model))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        part = seqs.take(torch.randint(len(seqs.ids), (batch,), generator=gen))
        logps, mask = token_logps(model(part.ids), part)
        loss = -(logps.sum() / mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


@dataclass
class PrefData:
    """A preference set with everything the loss reads, precomputed (teacher side constant)."""

    chosen: Seqs
    rejected: Seqs
    ref_chosen: Tensor  # [N, T] π_ref log-probs (the student's start)
    ref_rejected: Tensor
    values_chosen: Tensor  # [N, T+1] the value source of this method (zeros for DPO)
    values_rejected: Tensor
    teacher_logps_chosen: Tensor | None = None  # [N, T] for shaping="logprob"
    teacher_logps_rejected: Tensor | None = None


def pref_train(
    model: nn.Module,
    data: PrefData,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    loss_options: dict,
    sft_weight: float = 0.0,
    dpo: bool = True,
) -> dict[str, float]:
    """Preference training with the library's `tvkd_loss` (its `sft_weight` adds λ·NLL(y_w)).

    `dpo=False` trains λ·NLL(y_w) alone: SFT on the chosen responses, the SFT-only baseline
    (same data, steps and schedule). Returns the last step's metrics.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.chosen.ids)
    metrics: dict[str, float] = {}
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        idx = torch.randint(n, (batch,), generator=gen).to(data.chosen.ids.device)
        c, r = data.chosen.take(idx), data.rejected.take(idx)
        width = max(c.ids.shape[1], r.ids.shape[1])
        logits = model(
            torch.cat([F.pad(c.ids, (0, width - c.ids.shape[1])), F.pad(r.ids, (0, width - r.ids.shape[1]))])
        )
        lp_c, m_c = token_logps(logits[:batch], c)
        lp_r, m_r = token_logps(logits[batch:], r)
        tc, tr = lp_c.shape[1], lp_r.shape[1]
        t_lp = {}
        if data.teacher_logps_chosen is not None and data.teacher_logps_rejected is not None:
            t_lp = {
                "chosen_teacher_logps": data.teacher_logps_chosen[idx, :tc],
                "rejected_teacher_logps": data.teacher_logps_rejected[idx, :tr],
            }
        sft = {"sft_weight": sft_weight} if sft_weight and dpo else {}
        loss, metrics = tvkd_loss(
            lp_c,
            lp_r,
            data.ref_chosen[idx, :tc],
            data.ref_rejected[idx, :tr],
            data.values_chosen[idx, : tc + 1],
            data.values_rejected[idx, : tr + 1],
            m_c,
            m_r,
            **t_lp,
            **loss_options,
            **sft,
        )
        if not dpo:  # SFT-only: λ·NLL(y_w) alone, the same per-pair mean as the library's term
            loss = sft_weight * (-(lp_c.sum(-1) / m_c.sum(-1))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return metrics


@torch.no_grad()
def greedy(model: nn.Module, prompts: Sequence[str], max_new: int = tw.MAX_ANSWER + 2) -> list[str]:
    """Greedy answers (text before EOS), prompts grouped by length so no padding is needed."""
    model.eval()
    out: dict[int, str] = {}
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for members in groups.values():
        ids = torch.tensor([tw.sequence(prompts[i])[0] for i in members], device=_device(model))
        done = torch.zeros(len(members), dtype=torch.bool, device=ids.device)
        for _ in range(max_new):
            nxt = model(ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tw.EOS), nxt)
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            done |= nxt == tw.EOS
            if bool(done.all()):
                break
        for row, i in zip(ids.tolist(), members, strict=True):
            out[i] = tw.decode(row[len(tw.sequence(prompts[i])[0]) :])
    return [out[i] for i in range(len(prompts))]


def gold_accuracy(model: nn.Module, tasks: Sequence[tw.Task]) -> float:
    """Fraction of tasks whose greedy answer passes the gold checker."""
    answers = greedy(model, [t.prompt for t in tasks])
    return sum(tw.check(t, a) for t, a in zip(tasks, answers, strict=True)) / len(tasks)


# --------------------------------------------------------------------------------------------
# Teacher signals and the per-method value tensors


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
