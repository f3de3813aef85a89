"""Training the MAISI VAE with MONAI's SupervisedTrainer: the iteration step, validation inferer and handlers.

- :class:`VAETrainStep` (``iteration_update``): generator step (L1 + KL [+ perceptual] [+ adversarial
  after a warm-up]) and, with a discriminator, the discriminator step.
- :class:`ReconstructionInferer`: posterior-mean encode + decode (tiled when asked) for validation.
- :class:`ReconstructionMontageHandler`: PNG of input vs reconstruction slices after each validation.
- :class:`VAEExporter`: writes ``models/model.pt`` + ``model.json`` (stage meduet_vae) on improvement
  of the validation metric and at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from monai.utils import CommonKeys

from custom_nets.engines.common.export import StageExporter
from custom_nets.engines.common.step import optimizer_step, scalars
from custom_nets.losses.vae import VAELoss
from custom_nets.nets.vae import STAGE, decode_latent, encode_volume, load_maisi_weights, network_args
from custom_nets.utils.checkpoint import load_stage_checkpoint, meta_path
from custom_nets.utils.parallel import unwrap
from custom_nets.utils.values import as_path
from custom_nets.utils.visualize import save_slice_montage

logger = logging.getLogger(__name__)


def patch_discriminator(channels: int = 64, num_layers_d: int = 3, in_channels: int = 1) -> torch.nn.Module:
    """MONAI ``PatchDiscriminator`` as in MAISI's VAE training (3-D, instance norm, leaky ReLU)."""
    return PatchDiscriminator(spatial_dims=3, num_layers_d=num_layers_d, channels=channels, in_channels=in_channels,
                              out_channels=1, norm="INSTANCE")


def training_state(**objects: Any) -> dict[str, Any]:
    """What a resumable checkpoint saves (``None`` entries, e.g. no discriminator, are left out)."""
    return {k: v for k, v in objects.items() if v is not None}


LOSS_TERMS = ("loss", "recon_loss", "kl_loss", "perceptual_loss", "adv_loss", "disc_loss")


def loss_terms(output: Any) -> dict[str, float]:
    """TensorBoard scalars of one :class:`VAETrainStep` output (as returned, or decollated by the
    trainer into one dict per crop with the losses replicated)."""
    return scalars(output, LOSS_TERMS)


def initialize_weights(network: torch.nn.Module, init_weights: str | Path | None) -> str:
    """Start training from existing weights: a meduet_vae checkpoint (with model.json) or MONAI's MAISI file.

    Args:
        network: the VAE to initialise (possibly DDP-wrapped).
        init_weights: path, or ``None`` for a random initialisation.

    Returns:
        What was done, in words (also logged).
    """
    if as_path(init_weights) is None:
        return "random initialisation"
    net = unwrap(network)
    if meta_path(init_weights).is_file():
        load_stage_checkpoint(net, init_weights, STAGE)
        msg = f"initialised from meduet_vae checkpoint {init_weights}"
    else:
        load_maisi_weights(net, init_weights)
        msg = f"initialised from MAISI weights {init_weights}"
    logger.info(msg)
    return msg


class VAETrainStep:
    """``iteration_update`` for ``SupervisedTrainer``: one VAE (and discriminator) update.

    Args:
        loss: :class:`VAELoss` (reconstruction, KL, optional perceptual).
        discriminator: optional patch discriminator (DDP-wrapped in multi-GPU runs).
        disc_optimizer: its optimizer (required with a discriminator).
        adv_weight: weight of the adversarial terms (MAISI: 0.1).
        adv_start_epoch: first epoch with adversarial terms (a warm-up lets the reconstruction settle first).
        image_key: batch key of the image crops.
        grad_clip: clip the generator's gradient norm (None: no clipping).

    Returns (per call):
        ``{"image", "pred", "loss", "recon_loss", "kl_loss", "perceptual_loss", "adv_loss", "disc_loss"}``.
    """

    def __init__(
        self,
        loss: VAELoss,
        discriminator: torch.nn.Module | None = None,
        disc_optimizer: torch.optim.Optimizer | None = None,
        adv_weight: float = 0.1,
        adv_start_epoch: int = 5,
        image_key: str = CommonKeys.IMAGE,
        grad_clip: float | None = None,
    ) -> None:
        if discriminator is not None and disc_optimizer is None:
            raise ValueError("a discriminator needs disc_optimizer")

        self.loss, self.discriminator, self.disc_optimizer = loss, discriminator, disc_optimizer
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.adv_weight, self.adv_start_epoch = float(adv_weight), int(adv_start_epoch)
        self.image_key, self.grad_clip = image_key, grad_clip

    def adversarial_active(self, epoch: int) -> bool:
        """Whether the adversarial terms are used in ``epoch`` (1-based)."""
        return self.discriminator is not None and self.adv_weight > 0 and epoch >= self.adv_start_epoch

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=True).as_subclass(torch.Tensor)
        adversarial = self.adversarial_active(engine.state.epoch)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        recon, z_mu, z_sigma = engine.network(images)
        terms = self.loss(recon, images, z_mu, z_sigma)
        loss_g = terms["loss"]
        adv_g = torch.zeros((), device=images.device)
        if adversarial:
            # the discriminator is fixed in the generator step: no gradients for it (and, under DDP,
            # no gradient hooks firing outside its own forward/backward pair)
            disc = unwrap(self.discriminator)
            disc.requires_grad_(False)
            logits_fake = disc(recon.float())[-1]
            adv_g = self.adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
            loss_g = loss_g + self.adv_weight * adv_g
        if not torch.isfinite(loss_g):
            raise FloatingPointError(f"VAE loss is {loss_g.item()} at iteration {engine.state.iteration}; lower the "
                                     f"learning rate or check the input intensities (expected 0..1)")
        optimizer_step(loss_g, engine.optimizer, engine.network.parameters(), grad_clip=self.grad_clip)
        disc_loss = torch.zeros((), device=images.device)
        if adversarial:
            unwrap(self.discriminator).requires_grad_(True)
            self.disc_optimizer.zero_grad(set_to_none=True)
            n = images.shape[0]
            # one forward over fake and real together: DDP expects one forward per backward
            logits = self.discriminator(torch.cat([recon.detach().float(), images.float()]))[-1]
            loss_fake = self.adv_loss(logits[:n], target_is_real=False, for_discriminator=True)
            loss_real = self.adv_loss(logits[n:], target_is_real=True, for_discriminator=True)
            disc_loss = 0.5 * (loss_fake + loss_real)
            optimizer_step(self.adv_weight * disc_loss, self.disc_optimizer, self.discriminator.parameters())
        return {
            CommonKeys.IMAGE: images,
            CommonKeys.PRED: recon.detach(),
            CommonKeys.LOSS: loss_g.detach(),
            "recon_loss": terms["recon_loss"].detach(),
            "kl_loss": terms["kl_loss"].detach(),
            "perceptual_loss": terms["perceptual_loss"].detach(),
            "adv_loss": adv_g.detach(),
            "disc_loss": disc_loss.detach(),
        }


class ReconstructionInferer:
    """Validation inferer: posterior-mean latent, then decoded (deterministic).

    Args:
        encode_roi: tile edge for encoding in image voxels (None: untiled).
        decode_roi: tile edge for decoding in latent voxels (None: untiled).
    """

    def __init__(self, encode_roi: int | None = None, decode_roi: int | None = None) -> None:
        self.encode_roi, self.decode_roi = encode_roi, decode_roi

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        net = unwrap(network)
        z = encode_volume(net, inputs, roi=self.encode_roi)
        return decode_latent(net, z, roi=self.decode_roi).to(inputs.device)


class ReconstructionMontageHandler:
    """After each validation run, save a PNG of the first validation volume and its reconstruction.

    Args:
        output_dir: folder of ``recon_epoch####.png``.
        image_key, pred_key: keys in the evaluator's (decollated) output.
    """

    def __init__(self, output_dir: str | Path, image_key: str = CommonKeys.IMAGE,
                 pred_key: str = CommonKeys.PRED) -> None:
        self.output_dir, self.image_key, self.pred_key = Path(output_dir), image_key, pred_key
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _reset(self, engine: Any) -> None:
        self._first = None

    def _keep_first(self, engine: Any) -> None:
        if self._first is not None:
            return
        out = engine.state.output
        first = out[0] if isinstance(out, list) else out
        image, pred = first[self.image_key], first[self.pred_key]
        self._first = (image.detach().cpu(), pred.detach().cpu())

    def _save(self, engine: Any) -> None:
        if self._first is None:
            return
        image, pred = self._first
        path = self.output_dir / f"recon_epoch{engine.state.epoch:04d}.png"
        save_slice_montage(path, [image, pred, (pred - image).abs()], ["input", "reconstruction", "|difference|"])
        logger.info("saved %s", path)


class VAEExporter(StageExporter):
    """Export the VAE as ``model.pt`` + ``model.json`` (stage meduet_vae), with its constructor
    arguments, latent channels and the evaluator's last metrics.

    Args:
        network: the trained VAE (possibly DDP-wrapped).
        path: destination ``models/model.pt``.
        evaluator: the validation evaluator (its key metric decides "best").
        policy: "best", "final" or "every N" (:class:`~custom_nets.engines.common.export.StageExporter`).
        extra: more metadata for model.json (e.g. crop size, data).
    """

    def __init__(self, network: torch.nn.Module, path: str | Path, evaluator: Any | None = None,
                 policy: str = "best", extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(network, path, STAGE, policy, evaluator, extra)

    def metadata(self, network: torch.nn.Module) -> dict[str, Any]:
        metrics = {} if self.evaluator is None else {
            k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))}
        return {"network": network_args(network), "latent_channels": int(network.latent_channels), "metrics": metrics}
