"""Exponential moving averages of a network.

- the MeDUET EMA teacher: theta_T <- m theta_T + (1 - m) theta_S, with m rising on a cosine from
  0.997 to 0.9997 (:func:`make_teacher`, :func:`cosine_momentum`, :func:`ema_update`);
- :class:`EMAModel`: the generator's EMA with the usual warm-up of its decay.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from custom_nets.utils.parallel import unwrap

__all__ = ["make_teacher", "cosine_momentum", "ema_update", "EMAModel"]


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


class EMAModel(torch.nn.Module):
    """Exponential moving average of a network's parameters (buffers copied).

    decay_k = min(decay, (1 + k) / (10 + k)) at update k: the usual warm-up, so that short runs
    (the demo's few dozen steps) export an average of what was learned rather than the
    initialisation; the target decay 0.9999 applies from update ~90 000 on.

    The copy and the update are those of the MeDUET EMA teacher (:func:`make_teacher`, :func:`ema_update`).

    Args:
        network: the trained network (DDP wrappers are unwrapped).
        decay: the target decay (0.9999 in the paper).
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.module = make_teacher(network)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        k = int(self.num_updates)
        return min(self.decay, (1 + k) / (10 + k))

    def update(self, network: torch.nn.Module) -> None:
        """One EMA step towards ``network`` (:func:`ema_update`) at the current decay."""
        ema_update(self.module, network, self.current_decay())
        self.num_updates += 1
