"""The optimizer and the learning-rate schedule of a training run.

AdamW with weight decay on matrices only (nanoGPT's rule: no decay on norms and biases), fused
on CUDA; the schedule is a linear warm-up to the peak rate, then a cosine down to
`min_lr_ratio` of it (`warmup_cosine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tvkd.config import TrainConfig


def adamw(
    params: Sequence[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the trainable `params` with the config's rate, betas and weight decay."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        fused=True if device.type == "cuda" else None,  # else torch's default (foreach)
    )


def warmup_cosine_factor(
    total_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> Callable[[int], float]:
    """LR factor of step s: linear warm-up to 1, then cosine down to `min_lr_ratio`."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first step already learns (HF's s/warmup wastes it)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of `warmup_cosine_factor` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_factor(total_steps, warmup_ratio, min_lr_ratio)
    )
