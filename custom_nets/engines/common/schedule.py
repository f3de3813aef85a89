"""Learning-rate schedule: linear warm-up from ``start_lr`` to the base lr, then cosine to ``final_lr``.

The unit is whatever the caller steps the scheduler by: the MeDUET step advances it every
iteration, so warm-up and total lengths are in iterations (epochs x iterations per epoch, see
:func:`epochs_to_steps`); stepping once per epoch with lengths in epochs works the same way.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine_lr", "warmup_cosine_scheduler", "epochs_to_steps"]


def warmup_cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float = 1e-4, start_lr: float = 1e-6,
    final_lr: float = 2e-5,
) -> float:
    """Learning rate at ``step``.

    Args:
        step: current step (0-based).
        total_steps: steps of the whole schedule; ``final_lr`` from there on.
        warmup_steps: linear warm-up length (``start_lr`` at 0, ``base_lr`` at ``warmup_steps``).
        base_lr: peak learning rate.
        start_lr: learning rate at step 0.
        final_lr: learning rate at the end of the cosine.

    Returns:
        The learning rate.
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0 or step >= total_steps:
        return final_lr if step >= total_steps else base_lr
    t = (step - warmup_steps) / span
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, start_lr: float = 1e-6,
    final_lr: float = 2e-5,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_lr` for each parameter group's initial lr.

    ``start_lr`` and ``final_lr`` are absolute for a group whose lr is the optimizer's default lr;
    other groups are scaled in proportion.
    """
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps ({warmup_steps}) and total_steps ({total_steps}) must be >= 0")
    base = float(optimizer.defaults["lr"])
    if base <= 0:
        raise ValueError(f"the optimizer's lr must be positive, got {base}")
    return LambdaLR(
        optimizer, lambda s: warmup_cosine_lr(s, total_steps, warmup_steps, base, start_lr, final_lr) / base
    )


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Epoch count -> iteration count (rounded)."""
    return int(round(epochs * steps_per_epoch))
