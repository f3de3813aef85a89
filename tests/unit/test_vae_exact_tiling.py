"""Exact tiled encoding that computes every convolution once (stage split "norm"): equal to one
untiled pass, no recomputation inside ResBlocks, and plumbed through segmentation inference."""

from __future__ import annotations

import pytest
import torch

from custom_nets.engines.seg.inference import LatentSlidingWindowInferer
from custom_nets.utils.hardware import cpu_has_native_bf16
from custom_nets.nets.latent_segmenter import LatentSegmenter, segmenter_config
from custom_nets.nets.vae import BF16_LATENT_TOLERANCE, _has_norm, encode_volume, maisi_vae, split_stages

# tiled results equal one untiled pass up to float32 summation order (as in test_vae.py)
TILED_TOLERANCE = 1e-4


def smooth_volume(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """(1, 1, X, Y, Z) in [0, 1]: an ellipsoid with an inner blob, a gradient and noise."""
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = ((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 < 1).float()
    blob = (((g[0] - 0.2) / 0.3) ** 2 + ((g[1] + 0.1) / 0.3) ** 2 + (g[2] / 0.5) ** 2 < 1).float()
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return (0.4 * body + 0.3 * blob + 0.1 * g[2] * body + 0.05 * noise).clamp(0, 1)[None, None]


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    # two ResBlocks per level as in the paper VAE, narrow; level changes give ResBlocks with a shortcut conv
    torch.manual_seed(0)
    return maisi_vae("demo", num_channels=[8, 16, 16], num_res_blocks=[2, 2, 2]).eval()


def test_norm_stages_each_start_at_their_only_groupnorm(vae: torch.nn.Module) -> None:
    stages = split_stages([*vae.encoder.blocks, vae.quant_conv_mu], "norm")
    norms = [[m for blk in st for m in blk.modules() if isinstance(m, torch.nn.GroupNorm)] for st in stages]
    assert all(len(n) <= 1 for n in norms)
    assert sum(len(n) for n in norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in vae.encoder.modules())
    # only the first stage (the input convolution before the first GroupNorm) runs anything before its norm
    for st in stages[1:]:
        assert _has_norm(st[0])


def test_norm_granularity_equals_an_untiled_pass_and_computes_each_convolution_once(vae: torch.nn.Module) -> None:
    """Each GroupNorm runs twice per tile of its stage (statistics pass, final pass); a convolution
    computed once runs only in the final pass, so half as often as the GroupNorm before it."""
    x = smooth_volume((48, 40, 32))
    full = encode_volume(vae, x, roi=None)
    calls: dict[str, int] = {}
    watched = ("norm1", "conv1.conv", "norm2", "conv2.conv")
    # pre-hooks: a GroupNorm collecting statistics raises, so a forward hook would miss that call
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in vae.encoder.named_modules() if name.endswith(watched)]
    counts = {}
    for granularity in ("norm", "block"):
        calls.clear()
        z = encode_volume(vae, x, roi=24, granularity=granularity)
        assert (z - full).abs().max().item() < TILED_TOLERANCE, granularity
        counts[granularity] = dict(calls)
    for h in hooks:
        h.remove()
    blocks = sorted({name.rsplit(".", 1)[0] for name in counts["norm"] if name.endswith("norm1")})
    assert len(blocks) == 6
    for blk in blocks:
        n = counts["norm"]
        assert 2 * n[f"{blk}.conv1.conv"] == n[f"{blk}.norm1"] and 2 * n[f"{blk}.conv2.conv"] == n[f"{blk}.norm2"], blk
        b = counts["block"]  # the block split recomputes conv1 for norm2's statistics
        assert 2 * b[f"{blk}.conv1.conv"] > b[f"{blk}.norm1"], blk


def test_bf16_stored_stage_outputs_stay_within_the_bf16_tolerance(vae: torch.nn.Module) -> None:
    x = smooth_volume((48, 40, 32), seed=1)
    full = encode_volume(vae, x, roi=None)
    runs = [dict(store_dtype=torch.bfloat16)]
    if cpu_has_native_bf16():  # emulated bf16 convolutions are ~10x slower; the storage check above still runs
        runs.append(dict(store_dtype=torch.bfloat16, precision="bf16"))
    for kw in runs:
        z = encode_volume(vae, x, roi=24, granularity="norm", **kw)
        d, s = (z - full).abs(), float(full.std())
        assert float(d.pow(2).mean().sqrt()) / s <= BF16_LATENT_TOLERANCE["rms"], kw
        assert float(d.max()) / s <= BF16_LATENT_TOLERANCE["max"], kw


def test_segmentation_inference_takes_the_norm_split() -> None:
    torch.manual_seed(0)
    net = LatentSegmenter(**segmenter_config("demo", num_classes=3)).eval()
    x = smooth_volume((64, 64, 48))
    with torch.no_grad():
        by_resolution = LatentSlidingWindowInferer(roi_size=64, vae_exact=True, vae_roi_size=32)(x, net)
        by_norm = LatentSlidingWindowInferer(roi_size=64, vae_exact=True, vae_roi_size=32,
                                             vae_granularity="norm")(x, net)
    assert (by_norm - by_resolution).abs().max().item() < 1e-3 * by_resolution.abs().max().item()
    with pytest.raises(ValueError, match="vae_granularity"):
        LatentSlidingWindowInferer(roi_size=64, vae_granularity="layer")
    with pytest.raises(ValueError, match="vae_store_dtype"):
        LatentSlidingWindowInferer(roi_size=64, vae_store_dtype="float16")
