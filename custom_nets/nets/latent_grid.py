"""Where a VAE latent voxel sits on the image grid, and resampling between such grids.

Two placements of MAISI latent voxel ``k`` (per axis):

- "encoder": the centre of its receptive field. A MAISI downsampling pads (0, 1) and applies a
  stride-2 3^3 convolution without padding, so output voxel ``j`` reads input voxels ``2j .. 2j+2``
  (centre ``2j + 1``); after two of them latent voxel ``k`` reads image voxels centred on ``4k + 3``.
- "decoder": where the VAE decoder writes it. A MAISI upsampling is trilinear x2 with
  ``align_corners=False`` (coarse ``j`` at fine ``2j + 0.5``), so latent ``k`` is decoded around
  ``4k + 1.5`` -- the placement ``F.interpolate(scale_factor=4, align_corners=False)`` assumes.

An untrained encoder follows the first; training the autoencoder to reconstruct through the decoder
moves the encoder's effective centre (its gradient-weighted sensitivity, :func:`measure_sensitivity_centre`)
towards the second. On the benchmark's trained demo VAE (issue 16) the sensitivity centre is 4k + 2.0
and a linear probe from the latent to the labels scores best at 4k + 1 .. 2 and on 4^3 blocks
(centre 4k + 1.5); see benchmarks/REPORT.md. Segmenters therefore place latent outputs on the
"decoder" grid by default.

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
    "LATENT_GRIDS",
    "encoder_latent_grid",
    "decoder_latent_grid",
    "vae_latent_grid",
    "measure_latent_grid",
    "measure_sensitivity_centre",
    "resample_grid",
    "latent_to_image",
]

Grid = tuple[float, float]  # (origin, spacing) in image voxels, the same on every axis
IMAGE_GRID: Grid = (0.0, 1.0)
LATENT_GRIDS = ("decoder", "encoder")


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


def decoder_latent_grid(vae: nn.Module) -> Grid:
    """Latent grid as a MAISI VAE decoder places it: each interpolating ``MaisiUpsample`` (trilinear
    x2, ``align_corners=False``) puts coarse voxel ``j`` at fine ``2j + 0.5``; composed from the image
    grid down: ``(a, s) -> (a + s / 2, 2 s)``. Transposed-convolution upsampling is refused.

    Args:
        vae: an ``AutoencoderKlMaisi`` (or anything with ``.decoder``).

    Returns:
        (origin, spacing) in image voxels.
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiUpsample

    origin, spacing = 0.0, 1.0
    for m in vae.decoder.modules():
        if isinstance(m, MaisiUpsample):
            if m.use_convtranspose:
                raise ValueError("transposed-convolution MAISI upsampling: use grid 'encoder' or measure it")
            origin, spacing = origin + spacing / 2.0, 2.0 * spacing
    return origin, spacing


def vae_latent_grid(vae: nn.Module, placement: str = "decoder") -> Grid:
    """:func:`decoder_latent_grid` or :func:`encoder_latent_grid` by name (see the module docstring)."""
    if placement == "decoder":
        return decoder_latent_grid(vae)
    if placement == "encoder":
        return encoder_latent_grid(vae)
    raise ValueError(f"latent grid placement must be one of {LATENT_GRIDS}, got {placement!r}")


def measure_sensitivity_centre(vae: nn.Module, image: torch.Tensor, voxels: Sequence[int] | None = None) -> float:
    """Effective centre of trained latent voxels: the squared-gradient-weighted mean image position.

    For latent voxels ``k`` along the first axis (at the middle of the others), the gradient of the
    channel sum of ``z[k]`` with respect to ``image`` is taken; its squared magnitude, summed over the
    other axes, weights the image positions. Returns the mean of ``centroid - spacing * k``.

    Args:
        vae: an ``AutoencoderKlMaisi`` (trained: the point of measuring).
        image: (1, C, X, Y, Z) a real input (GroupNorm statistics matter).
        voxels: latent indices to average over (default: the interior half).

    Returns:
        Offset ``o`` such that latent voxel ``k`` is effectively centred on image voxel ``4k + o``.
    """
    x = image.detach().clone().requires_grad_(True)
    z = vae.quant_conv_mu(vae.encoder(x)) if hasattr(vae, "quant_conv_mu") else vae.encoder(x)
    n, spacing = z.shape[2], x.shape[2] / z.shape[2]
    ks = list(voxels) if voxels is not None else list(range(n // 4, n - n // 4))
    mid = [s // 2 for s in z.shape[3:]]
    pos = torch.arange(x.shape[2], dtype=torch.float64)
    offsets = []
    for k in ks:
        (g,) = torch.autograd.grad(z[0, :, k, mid[0], mid[1]].sum(), x, retain_graph=True)
        w = (g.double() ** 2).sum(dim=(0, 1, 3, 4))
        offsets.append(float((w * pos).sum() / w.sum()) - spacing * k)
    return sum(offsets) / len(offsets)


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
