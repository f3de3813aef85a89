"""VAE training losses (MAISI recipe): L1 reconstruction + KL + optional perceptual and patch-adversarial terms.

Weights from MAISI's VAE training: KL 1e-7, perceptual 0.3, adversarial 0.1. The perceptual networks
MONAI offers all download pretrained weights; here they load from a local torch-hub folder given
by the user (``perceptual_weights``), and the term is off when none is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from custom_nets.utils.errors import InputError
from custom_nets.utils.values import as_path


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent channels and voxels, averaged over the batch.

    Args:
        z_mu, z_sigma: ``(B, C, x, y, z)`` posterior mean and standard deviation.
    """
    var = z_sigma.float().pow(2)
    kl = 0.5 * (z_mu.float().pow(2) + var - torch.log(var) - 1)
    return kl.sum(dim=tuple(range(1, kl.ndim))).mean()


def build_perceptual_loss(
    weights_dir: str | Path | None,
    network_type: str = "squeeze",
    is_fake_3d: bool = True,
    fake_3d_ratio: float = 0.2,
) -> nn.Module | None:
    """MONAI ``PerceptualLoss`` with its pretrained network read from a local torch-hub folder.

    Args:
        weights_dir: torch-hub folder holding the network (e.g. ``hub/checkpoints/squeezenet1_1-*.pth``
            for "squeeze", or the ``Warvito_MedicalNet-models_main`` repository and its weights for
            "medicalnet_*"), filled once on a machine with internet access. ``None``: no perceptual term.
        network_type: MONAI perceptual network ("squeeze" as in MAISI, "alex", "vgg", "medicalnet_...").
        is_fake_3d: 2.5-D evaluation on slices of the three axes (MAISI); MedicalNet needs False.
        fake_3d_ratio: fraction of slices used per axis.

    Returns:
        The loss module (frozen), or ``None`` when ``weights_dir`` is ``None``.

    Raises:
        InputError: ``weights_dir`` does not exist or the network cannot be built from it.
    """
    if as_path(weights_dir) is None:
        return None
    path = Path(weights_dir)
    if not path.is_dir():
        raise InputError(path, "perceptual_weights: folder not found (a torch-hub folder with the pretrained "
                               "perceptual network; set perceptual_weights to null to train without the term)")
    from monai.losses import PerceptualLoss

    try:
        loss = PerceptualLoss(spatial_dims=3, network_type=network_type, is_fake_3d=is_fake_3d,
                              fake_3d_ratio=fake_3d_ratio, cache_dir=str(path))
    except Exception as e:  # missing package (lpips), missing weights (download attempted offline), ...
        raise InputError(path, f"perceptual_weights: cannot build the {network_type!r} perceptual network from this "
                               f"folder ({type(e).__name__}: {e})") from e
    return loss.eval().requires_grad_(False)


class VAELoss(nn.Module):
    """Generator-side VAE loss without the adversarial term: ``L1 + kl_weight * KL + perceptual_weight * P``.

    Args:
        kl_weight: weight of :func:`kl_divergence` (MAISI: 1e-7).
        perceptual: optional perceptual loss module (:func:`build_perceptual_loss`).
        perceptual_weight: its weight (MAISI: 0.3).
    """

    def __init__(self, kl_weight: float = 1e-7, perceptual: nn.Module | None = None,
                 perceptual_weight: float = 0.3) -> None:
        super().__init__()
        self.kl_weight = float(kl_weight)
        self.perceptual = perceptual
        self.perceptual_weight = float(perceptual_weight)

    def forward(self, recon: torch.Tensor, target: torch.Tensor, z_mu: torch.Tensor,
                z_sigma: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "recon_loss", "kl_loss", "perceptual_loss"}`` (scalars; unweighted terms)."""
        recon_loss = torch.nn.functional.l1_loss(recon.float(), target.float())
        kl = kl_divergence(z_mu, z_sigma)
        loss = recon_loss + self.kl_weight * kl
        perceptual = torch.zeros((), device=recon.device)
        if self.perceptual is not None:
            perceptual = self.perceptual(recon.float(), target.float())
            loss = loss + self.perceptual_weight * perceptual
        return {"loss": loss, "recon_loss": recon_loss, "kl_loss": kl, "perceptual_loss": perceptual}
