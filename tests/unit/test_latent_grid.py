"""Latent-to-image alignment: the MAISI encoder's grid, grid resampling, and the segmenter's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom_nets.nets.latent_grid import (
    decoder_latent_grid,
    encoder_latent_grid,
    latent_to_image,
    measure_latent_grid,
    measure_sensitivity_centre,
    resample_grid,
)
from custom_nets.nets.latent_segmenter import LatentSegmenter
from custom_nets.nets.vae import maisi_vae, vae_config

ENC = dict(in_channels=4, patch_size=4, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0)


def test_encoder_grid_measured_equals_derived() -> None:
    """The receptive-field centres of a MAISI encoder sit on image voxel 4k + 3 (the geometry, any weights)."""
    torch.manual_seed(0)
    vae = maisi_vae("demo")
    (origin, spacing), centres = measure_latent_grid(vae, size=72)
    assert spacing == pytest.approx(4.0)
    assert origin == pytest.approx(3.0)
    assert all(c == pytest.approx(3.0) for c in centres)
    assert encoder_latent_grid(vae) == (3.0, 4.0)


def test_align_corners_false_is_a_grid() -> None:
    """``F.interpolate(align_corners=False)`` x4 is the grid (1.5, 4): the paper's placement stays reachable."""
    x = torch.randn(1, 2, 3, 5, 4)
    ref = F.interpolate(x, scale_factor=4, mode="trilinear", align_corners=False)
    assert torch.allclose(latent_to_image(x, (1.5, 4.0)), ref, atol=1e-5)
    half = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    assert torch.allclose(resample_grid(x, half.shape[2:], (0.5, 2.0), (0.0, 1.0)), half, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_latent_impulse_lands_on_its_receptive_field(k: int) -> None:
    x = torch.zeros(1, 1, 6, 6, 6)
    x[0, 0, k, k, k] = 1.0
    up = latent_to_image(x, (3.0, 4.0))
    assert up.shape[2:] == (24, 24, 24)
    peak = [int(i) for i in torch.nonzero(up[0, 0] == up.max())[0]]
    assert peak == [4 * k + 3] * 3
    # on the half-resolution grid (0, 2) the centre 4k + 3 falls between voxels 2k + 1 and 2k + 2
    half = resample_grid(x, (12, 12, 12), (3.0, 4.0), (0.0, 2.0))[0, 0]
    assert half[2 * k + 1, 2 * k + 1, 2 * k + 1] == pytest.approx(half[2 * k + 2, 2 * k + 2, 2 * k + 2])
    assert half[2 * k + 1, 2 * k + 1, 2 * k + 1] > half[2 * k, 2 * k, 2 * k]


@pytest.mark.parametrize("grid", ["decoder", "encoder"])
def test_segmenter_places_latent_logits_on_its_grid(grid: str, monkeypatch) -> None:
    """A logit peak on latent voxel k must come out where the configured grid puts k: 4k + 1.5 (between
    voxels 4k + 1 and 4k + 2, "decoder") or 4k + 3 ("encoder"); a shifted result fails."""
    torch.manual_seed(0)
    net = LatentSegmenter(vae=vae_config("demo"), encoder=ENC, num_classes=2, roi_size=32, feature_size=4,
                          decoder="paper", latent_grid=grid).eval()
    k = 3
    feats = torch.zeros(1, 4, 8, 8, 8)
    feats[0, :, k, k, k] = 1.0
    monkeypatch.setattr(net, "decode_features", lambda latent: feats)
    conv = net.output_conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1] = 1.0
        conv.bias.zero_()
        out = net.forward_latent(torch.zeros(1, 4, 8, 8, 8))
    profile = out[0, 1, :, 4 * k + 1, 4 * k + 1]
    top = sorted(torch.topk(profile, 2).indices.tolist())
    if grid == "decoder":
        assert top == [4 * k + 1, 4 * k + 2] and profile[4 * k + 1] == pytest.approx(float(profile[4 * k + 2]))
        # the paper arrangement: identical to trilinear x4 with align_corners=False
        ref = F.interpolate(net.out(feats), scale_factor=4, mode="trilinear", align_corners=False)
        assert torch.allclose(out, ref, atol=1e-5)
    else:
        assert int(profile.argmax()) == 4 * k + 3
    with pytest.raises(ValueError, match="latent_grid"):
        LatentSegmenter(vae=vae_config("demo"), encoder=ENC, num_classes=2, roi_size=32, latent_grid="centre")


def test_decoder_grid_and_trained_sensitivity_measure() -> None:
    """The decoder grid is (1.5, 4); the sensitivity centre of an encoder lies inside its receptive field."""
    torch.manual_seed(0)
    vae = maisi_vae("demo").eval()
    assert decoder_latent_grid(vae) == (1.5, 4.0)
    centre = measure_sensitivity_centre(vae, torch.rand(1, 1, 48, 48, 48), voxels=[5, 6])
    assert -8.0 < centre < 14.0
