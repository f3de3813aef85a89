"""The generator's objective and latent scaling (meduet_ldm; METHOD.md section 4).

- rectified flow / flow matching (SiT, default) with MONAI's ``RFlowScheduler``. MONAI's
  convention, checked in its source: timesteps t run over [0, T] (T = num_train_timesteps),
  ``add_noise`` gives x_t = (1 - t/T) x0 + (t/T) noise (t = T is pure noise; it needs 5-D
  tensors), and the network predicts the velocity v = x0 - noise, which sampling integrates from
  t = T down to 0 as x <- x + v (t - t_next) / T;
- DDPM with 1000 linear-beta steps (DiT) through ``DDPMScheduler``: the network predicts the
  noise (or ``v`` / ``sample`` per the scheduler's prediction_type).

Latents are multiplied by a scale factor (1 / standard deviation of the training latents,
:func:`latent_scale_factor`) before noise is added; the factor is computed once on the data,
stored in the resumable state and in ``model.json``, and divided out again before decoding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.scheduler import Scheduler

from custom_nets.data.latent_cache import open_latent
from custom_nets.utils.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["is_flow", "make_scheduler", "scheduler_args", "scheduler_from_args", "sample_training_timesteps",
           "training_target", "diffusion_loss", "latent_scale_factor"]


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def is_flow(scheduler: Scheduler) -> bool:
    """True for rectified flow (velocity target), False for DDPM-family schedulers."""
    return isinstance(scheduler, RFlowScheduler)


def make_scheduler(objective: str = "flow", num_train_timesteps: int = 1000, **kwargs: Any) -> Scheduler:
    """Training scheduler of an objective.

    Args:
        objective: "flow" (``RFlowScheduler``, continuous uniform timesteps unless overridden) or
            "ddpm" (``DDPMScheduler``, linear betas, epsilon prediction, no clipping of x0 since
            scaled latents are not bounded to [-1, 1]).
        num_train_timesteps: T.
        kwargs: further scheduler arguments.
    """
    if objective == "flow":
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, **{"use_discrete_timesteps": False, **kwargs})
    if objective == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps, **{"schedule": "linear_beta", "clip_sample": False, **kwargs}
        )
    raise ValueError(f"unknown objective {objective!r}; expected 'flow' or 'ddpm'")


def scheduler_args(scheduler: Scheduler) -> dict[str, Any]:
    """What model.json records so that sampling rebuilds the training scheduler."""
    if is_flow(scheduler):
        return dict(
            objective="flow",
            num_train_timesteps=scheduler.num_train_timesteps,
            use_discrete_timesteps=scheduler.use_discrete_timesteps,
            sample_method=scheduler.sample_method,
            use_timestep_transform=scheduler.use_timestep_transform,
            base_img_size_numel=scheduler.base_img_size_numel,
        )
    return dict(
        objective="ddpm",
        num_train_timesteps=scheduler.num_train_timesteps,
        prediction_type=str(scheduler.prediction_type),
        # betas are a function of the schedule; record the two ends of the linear schedule
        beta_start=float(scheduler.betas[0]),
        beta_end=float(scheduler.betas[-1]),
    )


def scheduler_from_args(args: Mapping[str, Any]) -> Scheduler:
    """Inverse of :func:`scheduler_args`."""
    args = dict(args)
    objective = args.pop("objective")
    return make_scheduler(objective, **args)


def sample_training_timesteps(scheduler: Scheduler, x0: torch.Tensor) -> torch.Tensor:
    """(B,) training timesteps in [0, T]: the flow scheduler's own sampler, uniform integers for DDPM."""
    if is_flow(scheduler):
        return scheduler.sample_timesteps(x0)
    return torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)


def training_target(scheduler: Scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict at (x_t, t)."""
    if is_flow(scheduler):
        return x0 - noise
    kind = str(scheduler.prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def diffusion_loss(
    network: torch.nn.Module,
    x0: torch.Tensor,
    content: torch.Tensor | None,
    style: torch.Tensor | None,
    scheduler: Scheduler,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    content_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss (mean squared error by default) between the network's prediction and the objective's target.

    Args:
        network: the generator, called as ``network(x_t, t, content, style)``.
        x0: (B, C, X, Y, Z) scaled clean latents.
        content, style: (B, D) factors (the network applies its condition dropout in train mode).
        scheduler: ``RFlowScheduler`` (velocity) or a DDPM-family scheduler.
        noise: fixed noise (default: standard normal).
        timesteps: fixed (B,) timesteps (default: sampled).
        loss_fn: (prediction, target) -> scalar.
        content_map: (B, Dc, mx, my, mz) content token maps of the crops, for generators built with
            ``content_map`` (passed as ``network(..., content_map=...)``); None: vectors only.

    Returns:
        Scalar loss.
    """
    if x0.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z) latents, got {tuple(x0.shape)}")
    noise = torch.randn_like(x0) if noise is None else noise
    t = sample_training_timesteps(scheduler, x0) if timesteps is None else timesteps.to(x0.device)
    xt = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    pred = network(xt, t, content, style) if content_map is None else network(xt, t, content, style, content_map=content_map)
    return loss_fn(pred.float(), training_target(scheduler, x0, noise, t).float())


# --------------------------------------------------------------------------------------------
# Latent scale
# --------------------------------------------------------------------------------------------


def latent_scale_factor(items: Sequence[Mapping[str, Any]], max_volumes: int = 16) -> float:
    """1 / standard deviation of the voxels of the first ``max_volumes`` training latents.

    Whole volumes rather than the first random batch (the paper's choice): the value is then the
    same on every rank of a multi-GPU run and from run to run.

    Args:
        items: latent datalist items (absolute ``latent`` paths, as ``load_latent_datalist`` gives).
        max_volumes: how many volumes to read.
    """
    if not items:
        raise ValueError("no training latents to compute the scale factor from")
    total, total_sq, count = 0.0, 0.0, 0
    for item in items[:max_volumes]:
        z = np.asarray(open_latent(item["latent"]), dtype=np.float64)
        total += float(z.sum())
        total_sq += float(np.square(z).sum())
        count += z.size
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    if not std > 1e-8:
        raise InputError(items[0]["latent"], "training latents are constant; cannot compute a scale factor")
    factor = 1.0 / std
    logger.info("latent scale factor 1/std = %.6f (from %d volumes)", factor, min(len(items), max_volumes))
    return factor
