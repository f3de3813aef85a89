"""Random-intensity copies (custom_nets.data.intensity_copies): the unpaired route's paired partners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_nets.data.intensity_copies import (
    COPY_DOMAIN,
    IntensityCopyd,
    _gaussian_blur3d,
    _piecewise_linear,
    copy_seed,
    intensity_copy,
    with_intensity_copies,
)
from custom_nets.engines.vae.encode import latent_name


def _image() -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    body = (g ** 2).sum(0) < 0.8
    organ = ((g[0] - 0.3) ** 2 + g[1] ** 2 + g[2] ** 2) < 0.1
    return (0.3 * body + 0.4 * organ).float()[None]  # three tissues: 0, 0.3, 0.7


def test_piecewise_linear_is_np_interp_and_blur_keeps_constants() -> None:
    xs, ys = torch.linspace(0, 1, 5), torch.tensor([0.2, 1.0, 0.0, 0.6, 0.3])
    x = torch.rand(1000)
    np.testing.assert_allclose(_piecewise_linear(x, xs, ys).numpy(), np.interp(x.numpy(), xs.numpy(), ys.numpy()),
                               atol=1e-6)
    np.testing.assert_allclose(_piecewise_linear(xs, xs, ys).numpy(), ys.numpy(), atol=1e-6)  # the knots themselves
    const = torch.full((1, 6, 7, 8), 0.4)
    torch.testing.assert_close(_gaussian_blur3d(const, 1.0), const)
    impulse = torch.zeros(1, 9, 9, 9)
    impulse[0, 4, 4, 4] = 1.0
    blurred = _gaussian_blur3d(impulse, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred[0, 4, 4, 4] < 0.1
    torch.testing.assert_close(blurred, blurred.permute(0, 2, 1, 3))  # isotropic


def test_copies_are_reproducible_in_range_and_vary_tissue_order() -> None:
    img = _image()
    a, b = intensity_copy(img, 3), intensity_copy(img, 3)
    torch.testing.assert_close(a, b)
    assert a.shape == img.shape and a.dtype == torch.float32 and 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, intensity_copy(img, 4))
    # tissue order (background, body, organ) changes between seeds: the remapping is not monotone
    masks = [img == 0, (img - 0.3).abs() < 1e-6, (img - 0.7).abs() < 1e-6]
    orders = set()
    for seed in range(40):
        c = intensity_copy(img, seed, smooth_prob=0.0, noise_prob=0.0)
        orders.add(tuple(np.argsort([c[m].mean().item() for m in masks])))
    assert len(orders) >= 4, orders
    with pytest.raises(ValueError, match="knots"):
        intensity_copy(img, 0, knots=(1, 3))


def test_intensity_copyd_restyles_only_items_with_a_seed_and_keeps_meta() -> None:
    img = MetaTensor(_image(), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))
    t = IntensityCopyd(["image"])
    same = t({"image": img, "copy_seed": None})
    assert same["image"] is img
    out = t({"image": img, "copy_seed": 7})
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, img.affine)
    torch.testing.assert_close(out["image"].as_tensor(), intensity_copy(_image(), 7))
    assert torch.equal(img.as_tensor(), _image())  # the input is not modified


def test_with_intensity_copies_adds_a_domain_and_pairs_by_subject() -> None:
    items = [{"image": "/d/a.nii.gz", "domain": "s0", "domain_index": 0, "domains": ["s0", "s1"], "split": "training",
              "subject": "p0"},
             {"image": "/d/b.nii.gz", "domain": "s1", "domain_index": 1, "domains": ["s0", "s1"], "split": "training"},
             {"image": "/d/c.nii.gz", "domain": "s1", "domain_index": 1, "domains": ["s0", "s1"], "split": "validation"}]
    assert with_intensity_copies(items, 0) == items
    out = with_intensity_copies(items, 2)
    assert len(out) == 3 + 4 and all(it["domains"] == ["s0", "s1", COPY_DOMAIN] for it in out)
    assert [it["subject"] for it in out[:3]] == ["p0", "/d/b.nii.gz", "/d/c.nii.gz"]
    copies = out[3:]
    assert [(it["image"], it["copy_index"], it["subject"]) for it in copies] == [
        ("/d/a.nii.gz", 0, "p0"), ("/d/a.nii.gz", 1, "p0"), ("/d/b.nii.gz", 0, "/d/b.nii.gz"),
        ("/d/b.nii.gz", 1, "/d/b.nii.gz")]
    assert all(it["domain"] == COPY_DOMAIN and it["domain_index"] == 2 for it in copies)
    assert len({it["copy_seed"] for it in copies}) == 4 and copies[0]["copy_seed"] == copy_seed("/d/a.nii.gz", 0)
    assert "copy_index" not in out[0] and out[0]["domain"] == "s0"  # originals unchanged otherwise
    names = {latent_name(it) for it in out}
    assert len(names) == 7 and latent_name(copies[1]) == latent_name(out[0]).replace("s0/", f"{COPY_DOMAIN}/").replace(
        ".npy", "_copy1.npy")
    with pytest.raises(ValueError, match="already a domain"):
        with_intensity_copies(items, 1, domain="s1")
    with pytest.raises(ValueError, match=">= 0"):
        with_intensity_copies(items, -1)
