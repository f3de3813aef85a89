"""Style augmentation for fine-tuning with a frozen MeDUET model (METHOD.md section 5).

A style bank holds the token-wise mean style map of K training crops, updated across epochs with
an EMA (0.9). With probability ``prob`` a sample's style tokens are replaced by
``(1 - a) * s + a * bank`` with ``a ~ U(0.2, 0.5)``; the frozen MeDUET fuses them with the sample's
content and decodes a restyled latent, and ``weight`` (0.1 for segmentation, 0.3 for
classification) times the loss on the restyled samples is added to the loss.

The step runs original and restyled latents through the segmenter in one forward pass
(``network(image, latent=...)``), so DDP sees one forward per iteration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from custom_nets.engines.common.step import clip_and_step, engine_amp, scaled_backward
from custom_nets.nets.meduet import load_meduet
from custom_nets.utils.values import as_path
from custom_nets.utils.flags import as_bool

logger = logging.getLogger(__name__)

__all__ = ["StyleBank", "restyle_latent", "StyleAugmentedStep", "style_step_or_none"]


class StyleBank:
    """Token-wise mean style map of up to ``size`` crops per epoch, EMA-blended across epochs.

    Args:
        size: K, the crops that enter one epoch's mean.
        momentum: weight of the previous bank (0.9).
    """

    def __init__(self, size: int = 16, momentum: float = 0.9) -> None:
        if size < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need size >= 1 and 0 <= momentum < 1, got {size}, {momentum}")
        self.size, self.momentum = int(size), float(momentum)
        self.bank: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, style: torch.Tensor) -> None:
        """Accumulate (B, N, Ds) style maps until ``size`` crops were seen this epoch."""
        take = min(self.size - self._count, style.shape[0])
        if take <= 0:
            return
        part = style[:take].detach().float().sum(0)
        if self._sum is not None and self._sum.shape != part.shape:
            return  # another crop size (e.g. a smaller last crop): not mixed into the map
        self._sum = part if self._sum is None else self._sum + part
        self._count += take

    def end_epoch(self) -> None:
        """Fold this epoch's mean into the bank (the first epoch's mean starts it)."""
        if self._sum is None:
            return
        mean = self._sum / self._count
        self.bank = mean if self.bank is None else self.momentum * self.bank + (1 - self.momentum) * mean
        self._sum, self._count = None, 0

    def state_dict(self) -> dict[str, Any]:
        # the running sum too: checkpoints are taken when an epoch completes, possibly before
        # end_epoch() ran (handler order), and the sum belongs to that completed epoch
        return {"bank": self.bank, "sum": self._sum, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore, then fold a pending sum (it belongs to the epoch the checkpoint completed)."""
        self.bank = state.get("bank")
        self._sum, self._count = state.get("sum"), int(state.get("count", 0))
        self.end_epoch()


@torch.no_grad()
def restyle_latent(
    meduet: nn.Module, latent: torch.Tensor, content: torch.Tensor, style: torch.Tensor, bank: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """Decode latents whose style tokens move towards the bank.

    Args:
        meduet: frozen MeDUET network.
        latent: (b, C, x, y, z) original latents (for the grid).
        content: (b, N, Dc) content tokens; style: (b, N, Ds) style tokens.
        bank: (N, Ds) style map.
        alpha: (b,) mixing weights.

    Returns:
        (b, C, x, y, z) restyled latents.
    """
    grid = meduet.encoder.grid_of(latent.shape[2:])
    a = alpha.view(-1, 1, 1).to(style)
    mixed = (1 - a) * style + a * bank.to(style)[None]
    fused = meduet.fuse(content, mixed)
    ids = torch.arange(fused.shape[1], device=fused.device).expand(fused.shape[0], -1)
    patches = meduet.decode(fused, ids, grid)
    return meduet.unpatchify(patches, grid)


class StyleAugmentedStep:
    """``iteration_update`` of a MONAI ``SupervisedTrainer`` adding style-augmented samples.

    Args:
        meduet: frozen MeDUET network (:func:`custom_nets.nets.meduet.load_meduet`), or None to train without augmentation.
        prob: probability that a sample gets a restyled copy (0.3).
        alpha_range: range of the bank weight ``a`` (0.2, 0.5).
        weight: loss weight of the restyled samples (0.1 segmentation).
        bank_size: K crops per epoch in the style bank.
        momentum: EMA of the bank across epochs (0.9).
    """

    def __init__(
        self,
        meduet: nn.Module | None,
        prob: float = 0.3,
        alpha_range: Sequence[float] = (0.2, 0.5),
        weight: float = 0.1,
        bank_size: int = 16,
        momentum: float = 0.9,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.meduet = meduet
        self.prob = float(prob)
        self.alpha_range = (float(alpha_range[0]), float(alpha_range[1]))
        self.weight = float(weight)
        self.bank = StyleBank(bank_size, momentum)
        self._attached: set[int] = set()
        self.restyled_this_epoch = 0

    def _attach(self, engine: Any) -> None:
        if id(engine) not in self._attached:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._end_epoch)
            self._attached.add(id(engine))

    def _end_epoch(self, engine: Any) -> None:
        logger.info("epoch %d: %d restyled training crops", engine.state.epoch, self.restyled_this_epoch)
        self.restyled_this_epoch = 0
        self.bank.end_epoch()

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        self._attach(engine)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image, label = batch[0], batch[1]
        net = engine.network.module if isinstance(getattr(engine.network, "module", None), nn.Module) else engine.network
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        latent = net.encode_latent(image)  # the frozen VAE: no graph
        n = image.shape[0]
        selected = torch.zeros(n, dtype=torch.bool)
        if self.meduet is not None:
            with torch.no_grad():
                content, style = self.meduet.encode_factors(latent)
            self.bank.add(style)
            if self.bank.bank is not None and self.bank.bank.shape == style.shape[1:]:
                selected = torch.rand(n) < self.prob
        aug_idx = selected.nonzero().flatten().to(image.device)
        if len(aug_idx):
            lo, hi = self.alpha_range
            alpha = torch.empty(len(aug_idx)).uniform_(lo, hi)
            restyled = restyle_latent(self.meduet, latent[aug_idx], content[aug_idx], style[aug_idx],
                                      self.bank.bank, alpha)
            latent_in = torch.cat([latent, restyled.to(latent)])
            image_in = torch.cat([image, image[aug_idx]])
        else:
            latent_in, image_in = latent, image

        def compute() -> torch.Tensor:
            out = engine.network(image_in, latent=latent_in)
            pred = out[:n]
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(pred, label).mean()
            if len(aug_idx):
                loss = loss + self.weight * engine.loss_function(out[n:], label[aug_idx]).mean()
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return loss

        autocast, scaler = engine_amp(engine)
        with autocast:
            loss = compute()
        scaled_backward(loss, scaler)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        clip_and_step(engine.optimizer, engine.network.parameters(), scaler)
        self.restyled_this_epoch += int(len(aug_idx))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def style_step_or_none(enabled: bool, ssl_ckpt: str | Path | None, device: Any, **kwargs: Any) -> Callable | None:
    """Config helper: a :class:`StyleAugmentedStep` with the SSL checkpoint's MeDUET when ``enabled``, else None."""
    if not as_bool(enabled, "style_aug"):
        logger.info("style augmentation off")
        return None
    if as_path(ssl_ckpt) is None:
        raise ValueError("style augmentation needs the MeDUET model: set ssl_ckpt to a meduet_ssl checkpoint")
    logger.info("style augmentation on (MeDUET from %s)", ssl_ckpt)
    return StyleAugmentedStep(load_meduet(ssl_ckpt, device)[0], **kwargs)
