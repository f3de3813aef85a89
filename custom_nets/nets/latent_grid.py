"""Where a VAE latent voxel sits on the image grid, and resampling between such grids.

A MAISI downsampling pads (0, 1) and applies a stride-2 3^3 convolution without padding, so output
voxel ``j`` reads input voxels ``2j .. 2j+2`` and is centred on input voxel ``2j + 1``. The other
encoder convolutions are 3^3 with symmetric padding (centre preserved). After two downsamplings
latent voxel ``k`` is centred on image voxel ``4k + 3`` (per axis), whereas ``F.interpolate(...,
scale_factor=4, mode="trilinear", align_corners=False)`` places it at ``4k + 1.5``: logits
upsampled that way land 1.5 voxels too low on every axis.

A grid is described per axis by ``(origin, spacing)`` in image-voxel units: voxel ``k`` of the grid
is centred on image coordinate ``origin + spacing * k``. The image grid is ``(0, 1)``; the MAISI
latent grid ``(3, 4)``; ``align_corners=False`` upsampling assumes ``((f - 1) / 2, f)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "Grid",
    "IMAGE_GRID",
    "encoder_latent_grid",
    "measure_latent_grid",
    "resample_grid",
    "latent_to_image",
]

Grid = tuple[float, float]  # (origin, spacing) in image voxels, the same on every axis
IMAGE_GRID: Grid = (0.0, 1.0)


def encoder_latent_grid(vae: nn.Module) -> Grid:
    """Latent grid of a MAISI VAE encoder, from its layers.

    Each ``MaisiDownsample`` (pad ``(0, 1)`` then a stride-2 3^3 convolution) maps grid
    ``(a, s)`` to ``(a + s, 2 s)``; every other layer keeps the centre (symmetric 3^3 convolutions).

    Args:
        vae: an ``AutoencoderKlMaisi`` (or anything with ``.encoder``).

    Returns:
        (origin, spacing): latent voxel ``k`` is centred on image voxel ``origin + spacing * k``.
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiDownsample

    origin, spacing = 0.0, 1.0
    for m in vae.encoder.modules():
        if isinstance(m, MaisiDownsample):
            pad = tuple(m.pad)
            conv = next(c for c in m.modules() if isinstance(c, nn.modules.conv._ConvNd))
            if pad[:2] != (0, 1) or conv.kernel_size[0] != 3 or conv.stride[0] != 2 or conv.padding[0] != 0:
                raise ValueError(f"unexpected MAISI downsampling (pad {pad}, {conv}); use measure_latent_grid")
            origin, spacing = origin + spacing, 2.0 * spacing
    return origin, spacing


def measure_latent_grid(vae: nn.Module, size: int = 40, channels: int | None = None) -> tuple[Grid, list[float]]:
    """Measure the latent grid from the encoder's receptive fields (autograd impulse response).

    For each latent voxel ``k`` along the first axis (at the centre of the others), the image voxels
    whose value changes its output (non-zero gradient of its channel sum) form an interval; its
    midpoint is the voxel's centre on the image grid. GroupNorm layers, whose statistics couple
    every voxel, are replaced by identities on a copy of the encoder (they do not move centres). A least-squares line through the centres gives
    (origin, spacing). Works for any weights (random ones included): it measures the geometry.

    Args:
        vae: an ``AutoencoderKlMaisi``.
        size: image edge of the probe volume (large enough that interior voxels are unclipped).
        channels: input channels (default ``vae.encoder`` in_channels or 1).

    Returns:
        ((origin, spacing), centres): the fitted grid and the measured centre of each interior voxel.
    """
    import copy

    ci = int(channels or getattr(vae, "in_channels", None) or 1)
    encoder = copy.deepcopy(vae.encoder).eval()
    for name, m in list(encoder.named_modules()):
        if isinstance(m, nn.GroupNorm):
            parent = encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else encoder
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    param = next(encoder.parameters())
    x = torch.randn(1, ci, size, size, size, dtype=param.dtype, device=param.device, requires_grad=True)
    z = encoder(x)
    n = z.shape[2]
    mid = n // 2
    centres: list[tuple[int, float]] = []
    for k in range(1, n - 1):  # the border voxels' fields are clipped by the volume
        (g,) = torch.autograd.grad(z[0, :, k, mid, mid].sum(), x, retain_graph=True)
        support = g.abs().sum(dim=(0, 1, 3, 4)).nonzero().flatten()
        lo, hi = int(support.min()), int(support.max())
        if lo == 0 or hi == size - 1:
            continue
        centres.append((k, (lo + hi) / 2.0))
    if len(centres) < 2:
        raise ValueError(f"probe volume {size}^3 too small to measure the latent grid; use a larger size")
    ks = torch.tensor([c[0] for c in centres], dtype=torch.float64)
    cs = torch.tensor([c[1] for c in centres], dtype=torch.float64)
    spacing = float(((ks - ks.mean()) * (cs - cs.mean())).sum() / ((ks - ks.mean()) ** 2).sum())
    origin = float(cs.mean() - spacing * ks.mean())
    return (origin, spacing), [c[1] - spacing * c[0] for c in centres]


def _resample_axis(x: torch.Tensor, dim: int, size: int, src: Grid, dst: Grid) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` from grid ``src`` onto ``size`` voxels of grid ``dst``.

    Outside the source voxel centres the nearest edge value is kept (border clamp), as
    ``F.interpolate`` does.
    """
    n = x.shape[dim]
    pos = dst[0] + dst[1] * torch.arange(size, device=x.device, dtype=torch.float64)
    s = ((pos - src[0]) / src[1]).clamp(0, n - 1)
    lo = s.floor().long().clamp(max=max(n - 2, 0))
    hi = (lo + 1).clamp(max=n - 1)
    w = (s - lo).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = size
    a, b = x.index_select(dim, lo), x.index_select(dim, hi)
    return a + (b - a) * w.reshape(shape)


def resample_grid(x: torch.Tensor, size: Sequence[int], src: Grid, dst: Grid) -> torch.Tensor:
    """Separable (tri)linear resampling of ``(B, C, *spatial)`` from grid ``src`` onto grid ``dst``.

    Args:
        x: features on the source grid.
        size: output spatial size.
        src: (origin, spacing) of the source grid in image voxels.
        dst: (origin, spacing) of the output grid in image voxels.

    Returns:
        (B, C, *size) features; output voxel ``i`` holds the source sampled at image coordinate
        ``dst_origin + dst_spacing * i``.
    """
    if len(size) != x.ndim - 2:
        raise ValueError(f"size {tuple(size)} does not match the {x.ndim - 2} spatial axes of x")
    for axis, s in enumerate(size):
        x = _resample_axis(x, axis + 2, int(s), src, dst)
    return x


def latent_to_image(x: torch.Tensor, latent_grid: Grid, size: Sequence[int] | None = None) -> torch.Tensor:
    """Latent-grid features/logits -> the image grid, each latent voxel placed where the encoder read it.

    Args:
        x: (B, C, x, y, z) on the latent grid.
        latent_grid: (origin, spacing) of the latent grid (:func:`encoder_latent_grid`).
        size: output spatial size (default ``spacing`` x the latent size).

    Returns:
        (B, C, *size) on the image grid.
    """
    f = latent_grid[1]
    size = [int(round(s * f)) for s in x.shape[2:]] if size is None else list(size)
    return resample_grid(x, size, latent_grid, IMAGE_GRID)
