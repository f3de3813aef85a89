"""Low-memory exact decoding: volumes held as slabs along X, each stage replacing its input by its
output slab by slab (custom_nets.nets.vae.run_blocks_slabs): same image as one untiled pass, fewer
bytes held, and a bfloat16-stored variant within its stated tolerance."""

from __future__ import annotations

import pytest
import torch

from custom_nets.nets.vae import (
    BF16_DECODE_TOLERANCE,
    SlabVolume,
    decode_latent,
    maisi_vae,
    row_cores,
    run_blocks_exact,
    run_blocks_slabs,
)

# tiled results equal one untiled pass up to float32 summation order (as in test_vae.py)
TILED_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    # two ResBlocks per level as in the paper VAE; the last level halves the width (16 -> 8) as the paper's does
    torch.manual_seed(0)
    return maisi_vae("demo", num_channels=[8, 16, 16], num_res_blocks=[2, 2, 2]).eval()


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 4, 12, 10, 8, generator=torch.Generator().manual_seed(3))


def test_slab_volume_crops_like_one_tensor_and_frees_dropped_rows() -> None:
    x = torch.arange(2 * 3 * 10 * 4 * 5, dtype=torch.float32).reshape(2, 3, 10, 4, 5)
    vol = SlabVolume([x[:, :, :3].clone(), x[:, :, 3:4].clone(), x[:, :, 4:].clone()])
    assert vol.stop == 10 and vol.nbytes() == x.numel() * 4
    for rows in (slice(0, 10), slice(2, 5), slice(3, 4), slice(5, 9)):
        sl = [rows, slice(1, 3), slice(0, 4)]
        assert torch.equal(vol.crop(sl), x[:, :, rows, 1:3, 0:4])
    assert torch.equal(vol.tensor(), x)

    vol.drop_before(2)  # cuts through the first slab: it keeps a copy of rows 2..3 only
    assert vol.first_row == 2 and vol.nbytes() == x[:, :, 2:].numel() * 4
    kept = vol.slabs[0]
    assert kept.untyped_storage().nbytes() == kept.numel() * 4  # not a view holding the dropped rows
    assert torch.equal(vol.crop([slice(2, 7), slice(0, 4), slice(0, 5)]), x[:, :, 2:7])
    vol.drop_before(4)
    assert len(vol.slabs) == 1 and vol.first_row == 4
    with pytest.raises(IndexError, match="rows"):
        vol.crop([slice(3, 6), slice(0, 4), slice(0, 5)])
    with pytest.raises(IndexError, match="dropped"):
        vol.tensor()
    with pytest.raises(ValueError, match="does not continue"):
        vol.append(torch.zeros(2, 3, 1, 4, 6))


def test_row_cores_partition_the_axis_growing_from_a_quarter_core() -> None:
    cores = row_cores(61, 16, 2)
    assert cores[0] == (0, 4) and cores[-1][1] == 61
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    assert [b - a for a, b in cores[:4]] == [4, 8, 16, 16]
    assert all(a % 2 == 0 for a, _ in cores)


def test_low_memory_decode_equals_an_untiled_pass_and_todays_decode(vae: torch.nn.Module,
                                                                    latent: torch.Tensor) -> None:
    full = decode_latent(vae, latent, roi=None)
    today = decode_latent(vae, latent, roi=6, low_memory=False)
    # tile caps small enough for several rows and columns of tiles in every stage (and slabs cut across)
    for cap in (16, 24, None):
        low = decode_latent(vae, latent, roi=6, tile_cap=cap)  # low_memory is the default
        assert low.shape == full.shape == (1, 1, 48, 40, 32)
        assert (low - full).abs().max().item() < TILED_TOLERANCE, cap
        assert (low - today).abs().max().item() < TILED_TOLERANCE, cap
    batch = torch.cat([latent, 0.5 * latent.flip(2)])
    low = decode_latent(vae, batch, roi=6, tile_cap=16)
    assert (low - decode_latent(vae, batch, roi=None)).abs().max().item() < TILED_TOLERANCE
    assert all(not m.__dict__.get("forward") for m in vae.modules())  # GroupNorm patches removed


def test_each_stage_holds_about_one_volume_not_two(vae: torch.nn.Module, latent: torch.Tensor) -> None:
    """Stored bytes: today's decode holds a stage's whole input and whole output; the slab path holds
    the larger of them plus a thin first slab (the stage at full resolution narrows 16 -> 8 channels)."""
    blocks = [vae.post_quant_conv, *vae.decoder.blocks]
    with torch.no_grad():
        _, peak = run_blocks_slabs(blocks, latent, 6, torch.device("cpu"), tile_cap=16)
        # today's largest stage: the one at full resolution with the widest input, held with its output
        h = run_blocks_exact(blocks[:-4], latent, 6, torch.device("cpu"), granularity="block")
    full_res_in = h.numel() * 4  # input of the first full-resolution ResBlock (16 channels, 48x40x32)
    assert h.shape[1:] == (16, 48, 40, 32)
    today = full_res_in * (1 + 8 / 16)  # plus its 8-channel output
    assert full_res_in <= peak <= full_res_in * 1.25 < today


def test_bf16_stored_decode_stays_within_the_bf16_tolerance(vae: torch.nn.Module, latent: torch.Tensor) -> None:
    ref = decode_latent(vae, latent, roi=6, tile_cap=16)
    low = decode_latent(vae, latent, roi=6, tile_cap=16, store_dtype=torch.bfloat16)
    d, s = (low - ref).abs(), float(ref.std())
    assert float(d.pow(2).mean().sqrt()) / s <= BF16_DECODE_TOLERANCE["rms"]
    assert float(d.max()) / s <= BF16_DECODE_TOLERANCE["max"]
    assert float(d.max()) > 0  # bfloat16 storage does round: the test compares two different paths
