"""Latent segmenter: shapes, frozen VAE, SSL encoder loading, latent- vs image-space windows, TorchScript."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from custom_nets.engines.seg.inference import LatentSlidingWindowInferer
from custom_nets.engines.seg.model import load_ssl_encoder, load_vae_weights, network_args_from_upstream
from custom_nets.engines.seg.train import select_fraction, trainable_parameters
from custom_nets.nets.latent_segmenter import LatentClassifier, LatentSegmenter
from custom_nets.nets.vae import maisi_vae, network_args, vae_config
from custom_nets.nets.vit import LatentViTEncoder
from custom_nets.utils.checkpoint import save_stage_checkpoint
from custom_nets.utils.errors import CheckpointError

ENC = dict(in_channels=4, patch_size=4, embed_dim=48, depth=4, num_heads=4, mlp_ratio=2.0)
ROI = 32  # image crop -> latent 8^3 -> token grid 2^3: the paper's 96 -> 24 -> 6 path, smaller


def tiny(decoder: str = "paper", num_classes: int = 3) -> LatentSegmenter:
    torch.manual_seed(0)
    return LatentSegmenter(vae=vae_config("demo"), encoder=ENC, num_classes=num_classes, roi_size=ROI,
                           feature_size=4, refine_channels=4 if decoder == "refine" else 0, decoder=decoder)


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 5, 1, 2)


@pytest.mark.parametrize("decoder", ["paper", "refine", "progressive"])
def test_shapes(decoder: str) -> None:
    net = tiny(decoder)
    refine = net.needs_image
    x = torch.rand(2, 1, ROI, ROI, ROI)
    assert net(x).shape == (2, 3, ROI, ROI, ROI)
    latent = net.encode_latent(x)
    assert latent.shape == (2, 4, ROI // 4, ROI // 4, ROI // 4)
    out = net.forward_latent(latent, x if refine else None)
    assert out.shape == (2, 3, ROI, ROI, ROI)
    # a non-square crop: positions are recomputed for the other token grid
    assert net(torch.rand(1, 1, 48, 32, 32)).shape == (1, 3, 48, 32, 32)
    if refine:
        with pytest.raises(ValueError, match="needs the image"):
            net.forward_latent(latent)
    with pytest.raises(ValueError, match="divisible"):
        LatentSegmenter(vae=vae_config("demo"), encoder=ENC, num_classes=3, roi_size=40)


def test_classifier_shapes() -> None:
    torch.manual_seed(0)
    clf = LatentClassifier(vae=vae_config("demo"), encoder=ENC, num_classes=3, roi_size=ROI)
    assert clf(torch.rand(2, 1, ROI, ROI, ROI)).shape == (2, 3)


def test_vae_stays_frozen() -> None:
    net = tiny()
    net.train()
    assert not net.vae.training and net.encoder.training
    assert all(not p.requires_grad for p in net.vae.parameters())
    params = trainable_parameters(net)
    assert not {id(p) for p in params} & {id(p) for p in net.vae.parameters()}
    before = {k: v.clone() for k, v in net.vae.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    net(torch.rand(1, 1, ROI, ROI, ROI)).square().mean().backward()
    opt.step()
    assert all(p.grad is None for p in net.vae.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.vae.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.encoder.parameters())


def _save_ssl(path, enc: LatentViTEncoder, extra: dict | None = None) -> None:
    sd = {"encoder." + k: v for k, v in enc.state_dict().items()}
    sd.update(extra or {})
    save_stage_checkpoint(sd, path, "meduet_ssl", network={"encoder": ENC}, latent_channels=4)


def test_ssl_encoder_loading(tmp_path, caplog) -> None:
    torch.manual_seed(1)
    src = LatentViTEncoder(**ENC)
    ckpt = tmp_path / "ssl" / "model.pt"
    _save_ssl(ckpt, src, extra={"content_head.weight": torch.zeros(48, 48)})  # other MeDUET parts are skipped
    net = tiny()
    with caplog.at_level(logging.INFO, logger="custom_nets.engines.seg.model"):
        load_ssl_encoder(net, ckpt)
    assert "position embedding: fixed sin-cos, recomputed for grid (2, 2, 2)" in caplog.text
    for k, v in src.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v), k

    # a missing tensor and a shape mismatch are named
    sd = {"encoder." + k: v for k, v in src.state_dict().items() if k != "norm.bias"}
    save_stage_checkpoint(sd, tmp_path / "bad1" / "model.pt", "meduet_ssl", network={"encoder": ENC})
    with pytest.raises(CheckpointError, match="norm.bias"):
        load_ssl_encoder(net, tmp_path / "bad1" / "model.pt")
    wide = LatentViTEncoder(**{**ENC, "embed_dim": 96})
    _save_ssl(tmp_path / "bad2" / "model.pt", wide)
    with pytest.raises(CheckpointError, match="patch_embed.weight"):
        load_ssl_encoder(net, tmp_path / "bad2" / "model.pt")
    # no encoder.* keys, wrong stage, missing file
    save_stage_checkpoint({"fusion.weight": torch.zeros(2)}, tmp_path / "bad3" / "model.pt", "meduet_ssl")
    with pytest.raises(CheckpointError, match="encoder"):
        load_ssl_encoder(net, tmp_path / "bad3" / "model.pt")
    save_stage_checkpoint(sd, tmp_path / "bad4" / "model.pt", "meduet_vae")
    with pytest.raises(CheckpointError, match="meduet_ssl"):
        load_ssl_encoder(net, tmp_path / "bad4" / "model.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_ssl_encoder(net, tmp_path / "missing" / "model.pt")


def test_vae_loading_and_args_from_upstream(tmp_path) -> None:
    torch.manual_seed(2)
    vae = maisi_vae("demo")
    vckpt = tmp_path / "vae" / "model.pt"
    save_stage_checkpoint(vae.state_dict(), vckpt, "meduet_vae", network=network_args(vae), latent_channels=4)
    sckpt = tmp_path / "ssl" / "model.pt"
    _save_ssl(sckpt, LatentViTEncoder(**ENC))
    args = network_args_from_upstream({"vae": vae_config("paper"), "encoder": {"embed_dim": 768}, "num_classes": 3,
                                       "roi_size": ROI, "feature_size": 4}, vckpt, sckpt)
    assert args["vae"]["num_channels"] == [8, 16, 16] and args["encoder"]["embed_dim"] == 48
    net = LatentSegmenter(**args)
    load_vae_weights(net, vckpt)
    assert all(torch.equal(net.vae.state_dict()[k], v) for k, v in vae.state_dict().items())
    # "none" means a randomly initialised ViT: the config's encoder arguments stay
    assert network_args_from_upstream({"encoder": {"embed_dim": 12}}, None, "none")["encoder"] == {"embed_dim": 12}


@pytest.mark.parametrize("decoder", ["paper", "refine", "progressive"])
def test_latent_windows_equal_encode_whole_then_window(decoder: str) -> None:
    """With whole-volume VAE statistics (vae_exact), latent-space windows must equal image-space windows
    whose latent is cut from the whole volume's latent: same positions, same full-resolution weights."""
    net = tiny(decoder).eval()
    refine = net.needs_image
    image = smooth_volume((48, 40, 32))
    with torch.no_grad():
        latent = net.vae.encode(image)[0]

        def reference(window: torch.Tensor, coords) -> torch.Tensor:
            sl = coords[0][2:]
            crop = latent[(slice(None), slice(None), *(slice(s.start // 4, s.stop // 4) for s in sl))]
            return net.forward_latent(crop, window if refine else None)

        ref = sliding_window_inference(image, (ROI,) * 3, 1, reference, overlap=0.5, mode="gaussian", with_coord=True)
        out = LatentSlidingWindowInferer(ROI, overlap=0.5, space="latent", vae_exact=True)(image, net)
    assert out.shape == ref.shape == (1, 3, 48, 40, 32)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_latent_and_image_windows_agree() -> None:
    """Encode-once vs re-encode-each-window.

    One window: identical. Several: not identical, by design. In image space every window is
    encoded on its own (GroupNorm statistics of the window, zero padding at its borders); in latent
    space the window is cut from blended tiles, and the ViT attends over all tokens of the window,
    so the difference reaches every voxel. On this random network (seed 0) that moves the logits by
    ~42% of their spread (correlation 0.83, 75% equal labels); a window misplaced by 8 voxels gives
    ~92% (correlation 0.24). The bounds below sit between the two; the exact check of the latent
    machinery is :func:`test_latent_windows_equal_encode_whole_then_window`.
    """
    net = tiny().eval()
    single = smooth_volume((ROI, ROI, ROI), seed=3)
    image = smooth_volume((64, 48, 48), seed=4)
    with torch.no_grad():
        a = LatentSlidingWindowInferer(ROI, space="latent")(single, net)
        b = LatentSlidingWindowInferer(ROI, space="image")(single, net)
        assert torch.allclose(a, b, atol=1e-4)
        lat = LatentSlidingWindowInferer(ROI, overlap=0.5, space="latent")(image, net)
        img = LatentSlidingWindowInferer(ROI, overlap=0.5, space="image")(image, net)
    shifted = torch.roll(img, shifts=8, dims=2)

    def stats(x: torch.Tensor) -> tuple[float, float, float]:
        rel = ((x - img).abs().mean() / img.std()).item()
        corr = torch.corrcoef(torch.stack([x.flatten(), img.flatten()]))[0, 1].item()
        return rel, corr, (x.argmax(1) == img.argmax(1)).float().mean().item()

    rel, corr, agree = stats(lat)
    assert rel < 0.6 and corr > 0.75 and agree > 0.65, (rel, corr, agree)
    rel_s, corr_s, _ = stats(shifted)
    assert rel_s > rel and corr_s < corr


@pytest.mark.parametrize("decoder", ["paper", "progressive"])
def test_torchscript_trace_matches_eager(decoder: str) -> None:
    net = tiny(decoder).eval()
    x = torch.rand(1, 1, ROI, ROI, ROI)
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        assert torch.allclose(traced(x), net(x), atol=1e-4)
        y = torch.rand(1, 1, ROI, ROI, ROI)
        assert torch.allclose(traced(y), net(y), atol=1e-4)


def test_select_fraction() -> None:
    items = [{"image": f"{d}{i}.nii.gz", "domain": d} for d in "ab" for i in range(10)]
    half = select_fraction(items, 0.5, seed=0)
    assert len(half) == 10 and {it["domain"] for it in half} == {"a", "b"}
    fifth = select_fraction(items, 0.2, seed=0)
    assert {it["image"] for it in fifth} <= {it["image"] for it in half}  # nested subsets
    assert select_fraction(items, 0.2, seed=0) == fifth
    assert len(select_fraction(items, 1.0)) == 20
    with pytest.raises(ValueError):
        select_fraction(items, 0.0)
