"""MAISI VAE factory, weight loading (MONAI's published MAISI file format) and tiled encode/decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_nets.nets.vae import (
    decode_latent,
    encode_volume,
    latent_affine,
    load_maisi_weights,
    load_vae,
    main,
    maisi_vae,
    network_args,
    parameter_count,
    vae_config,
    vae_for_checkpoint,
)
from custom_nets.utils.checkpoint import save_stage_checkpoint
from custom_nets.utils.errors import CheckpointError

# Tiled results must equal one untiled pass up to float32 rounding (sums in another order).
TILED_TOLERANCE = 1e-4


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(1, X, Y, Z) in [0, 1]: an ellipsoid 'body' with an 'organ' and a gradient, plus noise."""
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = ((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 < 1).float()
    organ = (((g[0] - 0.2) / 0.3) ** 2 + ((g[1] + 0.1) / 0.3) ** 2 + (g[2] / 0.5) ** 2 < 1).float()
    gen = torch.Generator().manual_seed(seed)
    x = 0.4 * body + 0.3 * organ + 0.1 * g[2] * body + 0.05 * torch.rand(shape, generator=gen)
    return x.clamp(0, 1)[None]


@pytest.fixture(scope="module")
def demo_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return maisi_vae("demo").eval()


def test_paper_network_is_maisi_ct_vae() -> None:
    net = maisi_vae("paper")  # construction only: a paper-scale forward pass is too slow for a CPU test
    assert parameter_count(net) == 20_944_897  # "about 20.9 M" (METHOD.md section 1)
    args = network_args(net)
    assert args["num_channels"] == [64, 128, 256] and args["num_res_blocks"] == [2, 2, 2]
    assert args["latent_channels"] == 4 and args["norm_num_groups"] == 32 and args["norm_eps"] == 1e-6
    assert args["attention_levels"] == [False, False, False]
    assert "norm_float16" not in args and "num_splits" not in args  # runtime-only, not recorded
    assert not net.encoder.blocks[1].norm1.norm_float16  # float16 GroupNorm crashes on CPU


def test_demo_shapes_and_config_errors(demo_vae: torch.nn.Module) -> None:
    x = smooth_volume((32, 32, 24))[None]
    with torch.no_grad():
        z_mu, z_sigma = demo_vae.encode(x)
        recon = demo_vae.decode(z_mu)
    assert z_mu.shape == (1, 4, 8, 8, 6) and z_sigma.shape == z_mu.shape
    assert recon.shape == x.shape
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        maisi_vae("demo", norm_num_groups=3)
    with pytest.raises(ValueError, match="unknown VAE size"):
        vae_config("huge")
    with pytest.raises(ValueError, match="multiple of 4"):
        encode_volume(demo_vae, torch.zeros(1, 30, 32, 32), roi=16)


def test_loads_maisi_weights_from_a_plain_state_dict(tmp_path: Path) -> None:
    """MONAI's maisi_ct_generative autoencoder file is a plain state_dict of a paper-size network."""
    torch.manual_seed(1)
    src = maisi_vae("paper")
    path = tmp_path / "autoencoder_epoch273.pt"
    torch.save(src.state_dict(), path)
    dst = load_maisi_weights(maisi_vae("paper"), path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k

    # the command line turns it into a meduet_vae stage checkpoint that load_vae reads back
    out = tmp_path / "models" / "model.pt"
    assert main(["import-maisi", "--src", str(path), "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["stage"] == "meduet_vae" and meta["latent_channels"] == 4
    assert meta["network"]["num_channels"] == [64, 128, 256]
    net, info = load_vae(out)
    assert info["sha256"] == meta["sha256"] and not net.training
    assert torch.equal(net.state_dict()["encoder.blocks.0.conv.conv.weight"],
                       src.state_dict()["encoder.blocks.0.conv.conv.weight"])


def test_maisi_weights_nested_prefixed_and_mismatched(tmp_path: Path, demo_vae: torch.nn.Module) -> None:
    sd = demo_vae.state_dict()
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": torch.tensor(273), "state_dict": {f"module.{k}": v for k, v in sd.items()}}, nested)
    net = load_maisi_weights(maisi_vae("demo"), nested)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())

    wrong = tmp_path / "other_size.pt"
    torch.save(maisi_vae("demo", num_channels=[16, 16, 32]).state_dict(), wrong)
    mismatch = r"other_size\.pt.*shape mismatch: encoder\.blocks\.0\.conv\.conv\.weight"
    with pytest.raises(CheckpointError, match=mismatch):
        load_maisi_weights(maisi_vae("demo"), wrong)

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("decoder.")}, partial)
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): decoder\."):
        load_maisi_weights(maisi_vae("demo"), partial)
    with pytest.raises(CheckpointError, match="not found"):
        load_maisi_weights(maisi_vae("demo"), tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"optimizer": {"lr": 1.0}}, junk)
    with pytest.raises(CheckpointError, match="no state_dict of tensors"):
        load_maisi_weights(maisi_vae("demo"), junk)


def test_network_follows_the_checkpoint_metadata(tmp_path: Path, demo_vae: torch.nn.Module) -> None:
    ckpt = tmp_path / "model.pt"
    assert network_args(vae_for_checkpoint(ckpt, "demo")) == vae_config("demo")  # nothing trained yet
    save_stage_checkpoint(demo_vae.state_dict(), ckpt, "meduet_vae", network=network_args(demo_vae), latent_channels=4)
    assert network_args(vae_for_checkpoint(ckpt, "paper")) == vae_config("demo")


def test_tiled_encode_and_decode_equal_an_untiled_pass(demo_vae: torch.nn.Module) -> None:
    """Tiles (halo + whole-volume GroupNorm statistics) reproduce one untiled pass: no seams by construction."""
    x = torch.stack([smooth_volume((48, 40, 32), seed=0), smooth_volume((48, 40, 32), seed=1) * 0.5])
    full = encode_volume(demo_vae, x, roi=None)
    tiled = encode_volume(demo_vae, x, roi=24)
    assert tiled.shape == full.shape == (2, 4, 12, 10, 8)
    assert (tiled - full).abs().max().item() < TILED_TOLERANCE
    assert all(not m.__dict__.get("forward") for m in demo_vae.modules())  # GroupNorm patches removed

    # the other stage split gives the same numbers (it only trades memory for recomputation)
    by_block = encode_volume(demo_vae, x, roi=24, granularity="block")
    assert (by_block - full).abs().max().item() < TILED_TOLERANCE

    dec_full = decode_latent(demo_vae, full[:1], roi=None)
    for granularity in ("block", "resolution"):
        dec_tiled = decode_latent(demo_vae, full[:1], roi=6, granularity=granularity)
        assert dec_tiled.shape == (1, 1, 48, 40, 32)
        assert (dec_tiled - dec_full).abs().max().item() < TILED_TOLERANCE, granularity

    # MAISI-style sliding window: every tile normalises by itself, so it differs from the untiled pass
    blended = encode_volume(demo_vae, x[:1], roi=24, overlap=0.5, exact=False)
    assert blended.shape == full[:1].shape and torch.isfinite(blended).all()
    assert (blended - full[:1]).abs().max().item() > 10 * TILED_TOLERANCE


def test_block_granularity_puts_one_normalised_block_in_each_stage(demo_vae: torch.nn.Module) -> None:
    from custom_nets.nets.vae import _has_norm, split_stages

    blocks = [demo_vae.post_quant_conv, *demo_vae.decoder.blocks]
    by_block = split_stages(blocks, "block")
    assert [b for st in by_block for b in st] == blocks
    assert all(sum(_has_norm(b) for b in st) == 1 for st in by_block)
    assert len(split_stages(blocks, "resolution")) < len(by_block)
    with pytest.raises(ValueError, match="granularity"):
        split_stages(blocks, "layer")


def test_latent_affine_puts_latent_voxels_at_block_centres() -> None:
    affine = np.array([[-1.5, 0, 0, 10.0], [0, 1.5, 0, -20.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])
    lat = np.array(latent_affine(affine))
    np.testing.assert_allclose(lat[:3, :3], affine[:3, :3] * 4)
    for idx in ([0, 0, 0], [2, 1, 3]):
        centre = np.mean([affine @ np.array([4 * i + d for i in idx] + [1]) for d in range(4)], axis=0)
        np.testing.assert_allclose(lat @ np.array(idx + [1]), centre)
