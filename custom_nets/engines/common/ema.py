"""EMA teacher: theta_T <- m theta_T + (1 - m) theta_S, with m rising on a cosine from 0.997 to 0.9997."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from custom_nets.utils.parallel import unwrap

__all__ = ["make_teacher", "cosine_momentum", "ema_update"]


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (unwrapped), in eval mode, without gradients."""
    teacher = copy.deepcopy(unwrap(student))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def cosine_momentum(step: int, total_steps: int, base: float = 0.997, final: float = 0.9997) -> float:
    """EMA momentum at ``step``: ``base`` at step 0, ``final`` at ``total_steps`` (and after).

    m(t) = final - (final - base) * (1 + cos(pi * t / T)) / 2.
    """
    if total_steps <= 0:
        return final
    t = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (1.0 + math.cos(math.pi * t)) / 2.0


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_T <- m theta_T + (1 - m) theta_S for every parameter; buffers are copied.

    Args:
        teacher: the EMA copy.
        student: the trained network (a DDP wrapper is unwrapped).
        momentum: m in [0, 1].
    """
    student = unwrap(student)
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    # lerp: t + (1 - m) * (s - t) = m t + (1 - m) s, in place, one fused call per dtype/device group
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
