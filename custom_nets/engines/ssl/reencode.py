"""The student's streamed re-encoding loss (MFTD and SiQC re-encode decoded latents; METHOD.md section 3).

:func:`streamed_reencode_loss` re-encodes the student's decoded latents in chunks and takes each
chunk's loss gradient at once (:class:`StreamedReencodeLoss`): the gradients of one big graph with
the activation memory of one chunk and no recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["REENCODE_MODULES", "StreamedReencodeLoss", "streamed_reencode_loss"]

REENCODE_MODULES = ("encoder", "content_head", "style_head", "style_smooth")


class StreamedReencodeLoss(torch.autograd.Function):
    """Re-encode decoded latents in chunks, taking each chunk's loss gradient at once.

    The student's re-encoding losses are sums over re-encoded items (MFTD per item with fixed
    normalisers, SiQC per query with teacher keys that carry no gradient), so the gradient of their
    sum is the sum of per-chunk gradients. The forward pass runs every chunk through the plain
    encoder and heads (through detached aliases of the parameters, so that DistributedDataParallel's
    hooks do not fire), back-propagates the chunk's loss to the chunk's input and to the aliases and
    frees the chunk's activations; the backward pass hands the accumulated gradients to the real
    inputs. Same gradients as one big graph, with the activation memory of one chunk and no
    recomputation. ``grad_scale`` scales the inner backward like a GradScaler scales the outer one.
    """

    @staticmethod
    def forward(ctx, model, grid, chunk_loss, chunk_items, grad_scale, autocast, names, pred, *params):  # type: ignore[override]
        aliases = {name: p.detach().requires_grad_(p.requires_grad) for name, p in zip(names, params)}
        leaves = [a for a in aliases.values() if a.requires_grad]
        n = pred.shape[0]
        size = chunk_items if chunk_items > 0 else n
        grad_pred = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
        total = torch.zeros((), dtype=torch.float32, device=pred.device)
        parts = None
        with torch.enable_grad():
            for start in range(0, n, size):
                stop = min(start + size, n)
                leaf = pred[start:stop].detach().requires_grad_()
                with autocast():
                    content, style = torch.func.functional_call(model, aliases, (model.unpatchify(leaf, grid),))
                loss, chunk_parts = chunk_loss(content, style, start, stop)
                torch.autograd.backward(loss * grad_scale, inputs=[leaf, *leaves])
                grad_pred[start:stop] = leaf.grad
                total += loss.detach()
                parts = chunk_parts.detach() if parts is None else parts + chunk_parts.detach()
        ctx.grad_pred, ctx.grad_params = grad_pred, [a.grad for a in aliases.values()]
        ctx.grad_scale, ctx.pred_dtype = grad_scale, pred.dtype
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts):  # type: ignore[override]
        factor = grad_total.float() / ctx.grad_scale
        grad_pred = ctx.grad_pred.mul_(factor).to(ctx.pred_dtype)
        grads = [None if g is None else g.mul_(factor) for g in ctx.grad_params]
        ctx.grad_pred = ctx.grad_params = None  # let autograd take the buffers without copies
        return (None,) * 7 + (grad_pred, *grads)


def streamed_reencode_loss(
    model: nn.Module,
    pred: torch.Tensor,
    grid: tuple[int, int, int],
    chunk_loss: Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]],
    chunk_items: int = 2,
    grad_scale: float = 1.0,
    autocast: Callable[[], Any] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``chunk_loss`` over chunks of re-encoded predictions (:class:`StreamedReencodeLoss`).

    Args:
        model: the (unwrapped) MeDUET network; its encoder and factor heads re-encode.
        pred: (R, N, p^3 C) decoded latents (rows of the student's graph).
        grid: token grid.
        chunk_loss: ``(content (r, N, Dc), style (r, N, Ds), start, stop) -> (loss, parts)`` for
            rows [start, stop); ``loss`` is this chunk's share of the total (a sum over rows).
        chunk_items: rows per chunk (0: all at once).
        grad_scale: loss scale of the surrounding backward (GradScaler), 1 without scaling.
        autocast: context factory wrapped around the re-encoding.

    Returns:
        (loss with gradient to ``pred`` and the re-encoding parameters, summed parts without gradient).
    """
    named = [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in REENCODE_MODULES]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    return StreamedReencodeLoss.apply(model, grid, chunk_loss, chunk_items, grad_scale, autocast, names, pred, *params)
