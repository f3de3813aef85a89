"""Factor bank: cube placement, pooling over overlapping cubes, token-map stitching, files."""

from __future__ import annotations

import json

import pytest
import torch

from custom_nets.engines.ssl.factor_bank import (
    FACTOR_BANK_JSON,
    FactorBank,
    cube_starts,
    pad_latent,
    padded_shape,
    volume_factors,
)
from custom_nets.nets.vit import patchify
from custom_nets.utils.errors import InputError

TOKEN = 4


def token_means(cubes: torch.Tensor) -> torch.Tensor:
    """(P, C, p, p, p) -> (P, N, C): the mean latent value of each token (a position-free function)."""
    p, c = cubes.shape[:2]
    return patchify(cubes, TOKEN).reshape(p, -1, TOKEN**3, c).mean(2)


def fake_factor_fn(cubes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = token_means(cubes)
    return torch.cat([t, -t], dim=-1), t[..., :1] * 3.0


def test_cube_starts_follow_the_token_grid_with_at_least_the_requested_overlap():
    assert cube_starts((24, 24, 24)) == [(0, 0, 0)]
    starts = cube_starts((24, 40, 56), patch=24, overlap=0.25, token=TOKEN)
    ys = sorted({s[1] for s in starts})
    zs = sorted({s[2] for s in starts})
    assert ys == [0, 16] and zs == [0, 16, 32]  # stride 18 rounded down to 16; last cube ends at the end
    assert all(v % TOKEN == 0 for s in starts for v in s)
    with pytest.raises(ValueError, match="padded"):
        cube_starts((22, 24, 24))


def test_small_and_odd_volumes_are_padded_by_repeating_the_border():
    assert padded_shape((18, 26, 24), 24, TOKEN) == (24, 28, 24)
    x = torch.arange(18.0).reshape(1, 1, 18, 1, 1).expand(1, 1, 18, 2, 2)
    y = pad_latent(x, (24, 4, 4))
    assert y.shape == (1, 1, 24, 4, 4)
    assert torch.all(y[0, 0, 18:] == 17.0)


def test_vectors_are_means_over_tokens_then_cubes():
    torch.manual_seed(0)
    latent = torch.randn(3, 24, 32, 40)
    out = volume_factors(fake_factor_fn, latent, patch=24, overlap=0.25, token=TOKEN, batch_size=3)
    starts = cube_starts((24, 32, 40), 24, 0.25, TOKEN)
    assert out["n_cubes"] == len(starts) == 1 * 2 * 2
    cubes = torch.stack([latent[:, a : a + 24, b : b + 24, c : c + 24] for a, b, c in starts])
    content, style = fake_factor_fn(cubes)
    torch.testing.assert_close(out["content"], content.mean(1).mean(0))
    torch.testing.assert_close(out["style"], style.mean(1).mean(0))
    assert out["content"].shape == (6,) and out["style"].shape == (1,)
    assert "content_map" not in out


def test_token_maps_stitch_overlapping_cubes_onto_the_volume_grid():
    torch.manual_seed(1)
    latent = torch.randn(2, 30, 24, 36)  # 30 is padded to 32; the map keeps ceil(30/4) = 8 cells
    out = volume_factors(fake_factor_fn, latent, patch=24, overlap=0.25, token=TOKEN, token_maps=True)
    padded = pad_latent(latent[None], padded_shape(latent.shape[1:], 24, TOKEN))
    expected = token_means(padded)[0].T.reshape(2, 8, 6, 9)  # every token sees the same value in every cube
    assert out["content_map"].shape == (4, 8, 6, 9) and out["style_map"].shape == (1, 8, 6, 9)
    torch.testing.assert_close(out["content_map"][:2], expected)
    torch.testing.assert_close(out["style_map"][0], 3.0 * expected[0])


def test_bank_files_load_weights_only_and_disagreements_are_refused(tmp_path):
    items = [{"latent": f"v{i}.npy", "image": f"v{i}.nii.gz", "domain": "a" if i % 2 else "b"} for i in range(3)]
    content = torch.randn(3, 12)
    written = FactorBank(content, torch.randn(3, 6), torch.tensor([1, 0, 1]), items, ["b", "a"],
                         {"ssl_sha256": "abc", "patch_size": 24})
    assert written.save(tmp_path) == tmp_path / "factor_bank.pt" == written.path
    tensors = torch.load(tmp_path / "factor_bank.pt", weights_only=True)
    assert tensors["content"].dtype == torch.float32 and tensors["domain_index"].dtype == torch.int64
    bank = FactorBank.load(tmp_path)
    assert (bank.content_dim, bank.style_dim, len(bank)) == (12, 6, 3) and bank.meta["ssl_sha256"] == "abc"
    assert bank.items[1]["domain"] == "a" and bank.domains == ["b", "a"] and bank.meta["patch_size"] == 24
    torch.testing.assert_close(bank.content, content)
    # a loaded bank saves back to the same files
    bank.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / FACTOR_BANK_JSON).read_text()) == json.loads((tmp_path / FACTOR_BANK_JSON).read_text())
    meta = json.loads((tmp_path / FACTOR_BANK_JSON).read_text())
    meta["content_dim"] = 13
    (tmp_path / FACTOR_BANK_JSON).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match"):
        FactorBank.load(tmp_path)
    meta["content_dim"], meta["items"][2] = 12, {"image": "v2.nii.gz"}
    (tmp_path / FACTOR_BANK_JSON).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="no 'latent' path"):
        FactorBank.load(tmp_path)
    with pytest.raises(ValueError, match="disagree"):
        FactorBank(torch.randn(2, 4), torch.randn(3, 2), torch.zeros(3), items, ["a"], {"ssl_sha256": "s"}).save(tmp_path / "x")
    assert not (tmp_path / "x" / "factor_bank.pt").exists()
