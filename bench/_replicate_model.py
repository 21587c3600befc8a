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
