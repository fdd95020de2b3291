"""Learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_iters: int, total_iters: int,
                  style: str = "cosine") -> float:
    """Linear warmup to ``lr``, then decay to ``min_lr`` at ``total_iters`` (cosine/linear)."""
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if style == "constant" or total_iters <= warmup_iters:
        return lr
    progress = min(1.0, (step - warmup_iters) / (total_iters - warmup_iters))
    if style == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
