"""The training-step protocol shared by the four stages' steps.

- Precision: :func:`resolve_precision` ("auto" / "fp32" / "bf16" / "fp16" for a device),
  :func:`precision_autocast` (the autocast context of a precision), :func:`engine_amp` (the
  autocast context and gradient scaler of a MONAI trainer's ``amp`` setting, CUDA only).
- The update: :func:`scaled_backward` (backward through a gradient scaler when one is enabled),
  :func:`clip_and_step` (unscale, clip the gradient norm, step the optimizer, update the scaler),
  :func:`optimizer_step` (both). Callers zero the gradients where their step needs it.
- Decollated outputs (below).

MONAI's trainers decollate the step's output into a list with one dict per batch item (batch-level
scalars such as the loss replicated into every item), and MONAI's ready-made handlers read it that
way: the MLflow tracking that ``--tracking mlflow`` adds reads the loss with
``from_engine(["loss"], first=True)``, which gives the loss for ``[dict, ...]`` but a one-item
tuple for a bare dict. Steps that return batch-level scalars only (no per-item tensors to
decollate) are wrapped with :func:`as_decollated`, and our own output transforms read the first
item with :func:`first_item`, so that both forms work.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
try:
    from ignite.handlers import ProgressBar
except ImportError:  # pytorch-ignite 0.4.11 (what monai's ignite extra and so MONAI Label install) keeps it in contrib
    from ignite.contrib.handlers import ProgressBar

from custom_nets.utils.hardware import cpu_has_native_bf16

__all__ = [
    "resolve_precision", "precision_autocast", "engine_amp", "scaled_backward",
    "clip_and_step", "optimizer_step", "as_decollated", "first_item", "scalars", "LossProgressBar", "ProgressBar",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32", "bf16" or "fp16" for ``device``.

    "auto" picks bf16 on CUDA GPUs and CPUs with native bf16, fp32 on other CPUs. "fp16" (with
    gradient scaling) is a CUDA option. "bf16" on a CPU without native bf16 runs, much slower than
    fp32 (emulated matrix products), and warns.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("precision 'fp16' (with gradient scaling) needs a CUDA device; use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bfloat16 instructions: bf16 autocast will be slower than fp32", stacklevel=2)
    return precision


def precision_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast context of a resolved precision on ``device`` (a no-op for "fp32")."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def engine_amp(engine: Any) -> tuple[AbstractContextManager, Any | None]:
    """The autocast context and gradient scaler of a MONAI trainer's ``amp`` setting.

    Mixed precision applies on CUDA only (``engine.amp`` on a CPU run trains in float32).

    Returns:
        ``(autocast context, engine.scaler)`` with amp, ``(nullcontext(), None)`` without.
    """
    device = getattr(engine.state, "device", None) or getattr(engine, "device", None) or "cpu"
    if not (bool(getattr(engine, "amp", False)) and torch.device(device).type == "cuda"):
        return nullcontext(), None
    return torch.autocast("cuda", **(getattr(engine, "amp_kwargs", None) or {})), engine.scaler


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


def _scaling(scaler: Any | None) -> bool:
    return scaler is not None and scaler.is_enabled()


def scaled_backward(loss: torch.Tensor, scaler: Any | None = None) -> None:
    """``loss.backward()``, through ``scaler`` (a ``torch.amp.GradScaler``) when it is enabled."""
    (scaler.scale(loss) if _scaling(scaler) else loss).backward()


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    scaler: Any | None = None,
    grad_clip: float | None = None,
    measure_norm: bool = False,
    extra_optimizers: Sequence[torch.optim.Optimizer] = (),
) -> float:
    """Unscale the gradients, clip their global norm, step the optimizer and update the scaler.

    Args:
        optimizer: the optimizer of ``parameters``.
        parameters: the parameters whose gradient norm is clipped (those without a gradient are skipped).
        scaler: the gradient scaler of the backward pass (None or disabled: no scaling).
        grad_clip: max global gradient norm (None or <= 0: no clipping).
        measure_norm: compute the norm also when not clipping.
        extra_optimizers: optimizers of parameters outside ``parameters`` (e.g. a domain adversary with
            its own learning rate), stepped unclipped before the scaler updates.

    Returns:
        The gradient norm before clipping (nan when neither clipped nor measured).
    """
    scaling = _scaling(scaler)
    if scaling:
        scaler.unscale_(optimizer)
    params = [p for p in parameters if p.grad is not None]
    grad_norm = float("nan")
    if grad_clip is not None and grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    elif measure_norm and params:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    for opt in (optimizer, *extra_optimizers):
        if scaling:
            scaler.step(opt)
        else:
            opt.step()
    if scaling:
        scaler.update()
    return grad_norm


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    scaler: Any | None = None,
    grad_clip: float | None = None,
    measure_norm: bool = False,
) -> float:
    """:func:`scaled_backward` then :func:`clip_and_step`. Returns the gradient norm (see there)."""
    scaled_backward(loss, scaler)
    return clip_and_step(optimizer, parameters, scaler, grad_clip, measure_norm)


# --------------------------------------------------------------------------------------------
# Decollated outputs
# --------------------------------------------------------------------------------------------


def as_decollated(step: Callable[[Any, Any], Mapping[str, Any]]) -> Callable[[Any, Any], list[Mapping[str, Any]]]:
    """Wrap an ``iteration_update`` that returns one dict so that it returns ``[dict]``.

    Args:
        step: ``(engine, batch) -> {"loss": ..., ...}`` (batch-level scalars).

    Returns:
        ``(engine, batch) -> [{"loss": ..., ...}]``, what decollation of a batch of one would give.
    """

    def update(engine: Any, batchdata: Any) -> list[Mapping[str, Any]]:
        return [step(engine, batchdata)]

    update.__wrapped__ = step  # type: ignore[attr-defined]
    return update


def first_item(output: Any) -> Mapping[str, Any]:
    """The dict of a step output: the first item of a decollated list, or the dict itself."""
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and output:
        output = output[0]
    if not isinstance(output, Mapping):
        raise TypeError(f"expected a step output dict or a list of them, got {type(output).__name__}")
    return output


def scalars(output: Any, keys: Sequence[str] | None = None) -> dict[str, float]:
    """Float values of ``keys`` (default: every key) of a step output (:func:`first_item`); keys the
    step did not return are left out."""
    item = first_item(output)
    keys = list(item) if keys is None else [k for k in keys if k in item]
    return {k: float(item[k]) for k in keys}


class LossProgressBar:
    """ignite ``ProgressBar`` over the iterations of each epoch, showing the given loss terms.

    MONAI attaches handlers by calling ``attach(engine)`` without arguments, so the terms are given
    here. ``persist=False`` clears the bar at the end of each epoch (the StatsHandler lines stay).

    Args:
        keys: step-output keys to show (those present).
        persist: keep each epoch's finished bar on screen.
    """

    def __init__(self, keys: Sequence[str] = ("loss",), persist: bool = False) -> None:
        self.keys = list(keys)
        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: Any) -> None:
        self.bar.attach(engine, output_transform=lambda out: scalars(out, self.keys))

