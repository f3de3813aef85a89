"""Segmentation recipe: class-prior output bias, optimizer groups, class-balanced crops, progressive decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from monai.transforms import Compose, RandCropByPosNegLabeld

from custom_nets.engines.seg.recipe import (
    balanced_crop_transforms,
    class_frequencies,
    encoder_layer_id,
    init_output_bias,
    segmenter_param_groups,
)
from custom_nets.nets.latent_segmenter import LatentSegmenter
from custom_nets.nets.vae import vae_config

ENC = dict(in_channels=4, patch_size=4, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0)


def tiny(decoder: str = "progressive") -> LatentSegmenter:
    torch.manual_seed(0)
    return LatentSegmenter(vae=vae_config("demo"), encoder=ENC, num_classes=4, roi_size=32, feature_size=4,
                           decoder=decoder)


def test_class_frequencies_and_errors() -> None:
    lab = np.zeros((4, 4, 4), dtype=np.int16)
    lab[0] = 1
    lab[0, 0] = 3
    f = class_frequencies([lab, {"label": lab}], num_classes=4)
    assert torch.allclose(f, torch.tensor([48, 12, 0, 4], dtype=torch.float64) / 64)
    with pytest.raises(ValueError, match="0..3"):
        class_frequencies([lab + 1], num_classes=4)
    with pytest.raises(ValueError, match="no label voxels"):
        class_frequencies([], num_classes=4)


@pytest.mark.parametrize("kind", ["latent", "unet"])
def test_output_bias_starts_at_the_class_prior(kind: str) -> None:
    freq = torch.tensor([0.7, 0.2, 0.08, 0.02])
    if kind == "latent":
        net = tiny()
    else:
        net = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8), strides=(2,), num_res_units=1)
    bias = init_output_bias(net, freq)
    assert torch.allclose(torch.softmax(bias.double(), 0), freq.double(), atol=1e-6)
    if kind == "latent":
        # with zeroed weights the network predicts exactly the prior everywhere
        with torch.no_grad():
            net.output_conv.weight.zero_()
            p = torch.softmax(net(torch.rand(1, 1, 32, 32, 32)), 1).mean(dim=(0, 2, 3, 4))
        assert torch.allclose(p, freq, atol=1e-5)


def test_param_groups_layer_decay_and_frozen_vae() -> None:
    net = tiny()
    groups = segmenter_param_groups(net, lr=1e-3, encoder_lr_scale=0.5, layer_decay=0.5, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    depth = 3
    assert by_name["decoder"]["lr"] == pytest.approx(1e-3)
    assert by_name["encoder.layer4.no_decay"]["lr"] == pytest.approx(1e-3 * 0.5)  # final norm: top of the ViT
    assert by_name[f"encoder.layer{depth}"]["lr"] == pytest.approx(1e-3 * 0.5 * 0.5)  # last block
    assert by_name["encoder.layer0"]["lr"] == pytest.approx(1e-3 * 0.5 * 0.5 ** (depth + 1))  # patch embedding
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
    grouped = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert grouped == trainable and not any(id(p) in grouped for p in net.vae.parameters())
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # each parameter once
    assert encoder_layer_id("encoder.blocks.2.attn.qkv.weight", 3) == 3
    assert encoder_layer_id("vae.encoder.blocks.0.conv.conv.weight", 3) is None
    assert encoder_layer_id("skip_hi.transp_conv_init.conv.weight", 3) is None
    torch.optim.AdamW(groups)  # accepted as is ("name" is kept by torch)


def test_balanced_crops_reach_small_classes() -> None:
    """Equal class ratios put a 4^3 organ in about a third of 12^3 crops of a 48^3 volume, where
    positive/negative sampling (centre on any foreground voxel, body-dominated) rarely does."""
    label = np.zeros((1, 48, 48, 48), dtype=np.int16)
    label[0, 4:44, 4:44, 4:44] = 1  # "body"
    label[0, 30:34, 10:14, 20:24] = 2  # small organ
    label[0, 10:20, 10:20, 10:20] = 3  # medium organ
    item = {"image": np.random.default_rng(0).random((1, 48, 48, 48), dtype=np.float32), "label": label}
    cached, rand = balanced_crop_transforms(["image", "label"], "label", (12, 12, 12), num_classes=4, num_samples=8)
    pre = Compose(cached)(dict(item))
    assert "label_cls_indices" in pre and len(pre["label_cls_indices"]) == 4
    crop = Compose(rand)
    crop.set_random_state(0)
    posneg = RandCropByPosNegLabeld(["image", "label"], "label", (12, 12, 12), pos=1, neg=1, num_samples=8)
    posneg.set_random_state(0)
    hit_bal = hit_pn = n = 0
    for _ in range(40):
        for c in crop(dict(pre)):
            assert "label_cls_indices" not in c and c["image"].shape == (1, 12, 12, 12)
            hit_bal += bool((c["label"] == 2).any())
        for c in posneg(dict(item)):
            hit_pn += bool((c["label"] == 2).any())
            n += 1
    assert hit_bal / n > 0.2 and hit_bal > 3 * hit_pn, (hit_bal / n, hit_pn / n)
    with pytest.raises(ValueError, match="ratios"):
        balanced_crop_transforms(["image", "label"], "label", (12,) * 3, num_classes=4, ratios=[1, 1])


def test_progressive_decoder_skips_and_gradients() -> None:
    net = tiny("progressive")
    x = torch.rand(2, 1, 32, 32, 32)
    out = net(x)
    assert out.shape == (2, 4, 32, 32, 32)
    out.mean().backward()
    for name in ("image_full", "image_half", "decode_half", "decode_full", "skip_hi"):
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert all(p.grad is None for p in net.vae.parameters())
    assert net.network_args["decoder"] == "progressive" and net.network_args["latent_grid"] == "decoder"
