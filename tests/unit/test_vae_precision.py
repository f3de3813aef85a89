"""bf16 autocast and channels-last-3d options of the whole-volume VAE encode used by segmentation inference.

Two contracts: the latent stays within the stated tolerance of the float32 encode
(``BF16_LATENT_TOLERANCE`` for bf16, float32 rounding for channels-last), and the masks a
segmenter predicts from the bf16 latent agree with the float32 path (Dice >= 0.99 per label).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_nets.engines.seg.inference import LatentSlidingWindowInferer
from custom_nets.utils.hardware import cpu_has_native_bf16
from custom_nets.nets.latent_segmenter import LatentSegmenter, segmenter_config
from custom_nets.nets.vae import (
    BF16_LATENT_TOLERANCE,
    encode_volume,
    maisi_vae,
    resolve_encode_precision,
    vae_runtime,
)

# float32 paths that only change the memory layout or the tiling: equal up to summation order
FP32_TOLERANCE = 1e-4
MASK_DICE = 0.99

# Emulated bf16 (CPUs without AVX512-BF16/AMX) is about ten times slower than fp32 here: these tests
# would take minutes there and would test oneDNN's emulation rather than the path users run.
needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="CPU without native bf16: emulated bf16 convolutions are ~10x slower"
)


def phantom_volume(seed: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, X, Y, Z) CT phantom windowed to [0, 1] (the preprocessing's CT window) and its (1, X, Y, Z) labels."""
    from meduet_demo.phantoms import make_phantom

    p = make_phantom(seed, "ct_sharp", shape=shape)
    x = np.clip((p.image + 175.0) / 425.0, 0.0, 1.0)
    return torch.from_numpy(x).float()[None, None], torch.from_numpy(p.label.astype(np.int64))[None]


def relative_errors(z: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """RMS and largest absolute difference, as fractions of the reference latent's standard deviation."""
    d, s = (z - ref).abs(), float(ref.std())
    return {"rms": float(d.pow(2).mean().sqrt()) / s, "max": float(d.max()) / s}


@pytest.fixture(scope="module")
def demo_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return maisi_vae("demo").eval()


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return phantom_volume(3, (64, 64, 48))[0]


def test_channels_last_keeps_the_float32_latent_and_restores_the_layout() -> None:
    # 64 channels: oneDNN keeps narrower layers (the demo VAE's 8-16) in the standard layout anyway
    torch.manual_seed(0)
    vae = maisi_vae("demo", num_channels=[64, 64, 64], norm_num_groups=32).eval()
    volume = phantom_volume(4, (48, 48, 32))[0]
    ref = encode_volume(vae, volume, roi=None)
    blended = encode_volume(vae, volume, roi=32, exact=False)
    layouts: list[bool] = []
    conv = vae.encoder.blocks[1].conv1.conv
    hook = conv.register_forward_hook(
        lambda m, a, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d)))
    for kw in (dict(roi=None), dict(roi=32, exact=True)):
        z = encode_volume(vae, volume, channels_last=True, **kw)
        assert relative_errors(z, ref)["max"] < FP32_TOLERANCE, kw
    z = encode_volume(vae, volume, roi=32, exact=False, channels_last=True)
    assert relative_errors(z, blended)["max"] < FP32_TOLERANCE
    assert layouts and all(layouts)  # the channels-last kernels did run
    hook.remove()
    assert conv.conv.weight.is_contiguous()  # the layout is restored on exit
    with vae_runtime(vae, channels_last=True):
        weight = conv.conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    assert conv.conv.weight.is_contiguous()


@needs_native_bf16
def test_bf16_latent_within_the_stated_tolerance(demo_vae, volume) -> None:
    ref = encode_volume(demo_vae, volume, roi=None)
    for kw in (dict(roi=None), dict(roi=32, exact=True), dict(roi=None, channels_last=True),
               dict(roi=32, exact=True, store_dtype=torch.bfloat16)):
        err = relative_errors(encode_volume(demo_vae, volume, precision="bf16", **kw), ref)
        assert err["rms"] <= BF16_LATENT_TOLERANCE["rms"] and err["max"] <= BF16_LATENT_TOLERANCE["max"], (kw, err)
        assert err["rms"] > 1e-4, "bf16 autocast did not change anything: was it applied?"
    # blended tiles (the segmentation default) against float32 blended tiles of the same tiling
    blended = encode_volume(demo_vae, volume, roi=32, exact=False)
    err = relative_errors(encode_volume(demo_vae, volume, roi=32, exact=False, precision="bf16"), blended)
    assert err["rms"] <= BF16_LATENT_TOLERANCE["rms"] and err["max"] <= BF16_LATENT_TOLERANCE["max"], err


@needs_native_bf16
def test_bf16_masks_agree_with_the_float32_path() -> None:
    """A demo-size segmenter trained briefly on phantoms (random weights give near-tied logits that no
    real model has) segments a held-out phantom with float32 and with bf16 VAE encoding."""
    from meduet_demo.phantoms import PHANTOM_LABELS

    torch.manual_seed(0)
    # the paper decoder reads the latent only, as latent-space sliding windows need
    net = LatentSegmenter(**{**segmenter_config("demo", num_classes=len(PHANTOM_LABELS)), "decoder": "paper"})
    train = [phantom_volume(seed, (64, 64, 64)) for seed in range(3)]
    with torch.no_grad():
        latents = [(net.encode_latent(x), y) for x, y in train]  # frozen VAE: encode the crops once
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-3)
    for step in range(90):
        z, y = latents[step % len(latents)]
        loss = torch.nn.functional.cross_entropy(net.forward_latent(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    image, truth = phantom_volume(10, (96, 96, 64))
    # blended tiles: bf16 VAE against fp32; exact tiling (another latent by design, so its own fp32
    # reference): the fast configuration, bf16 stored stage outputs + bf16 VAE + bf16 windows
    exact = dict(vae_exact=True, vae_granularity="norm")
    settings = {
        "fp32": {},
        "bf16": dict(vae_precision="bf16"),
        "windows_bf16": dict(window_precision="bf16"),
        "exact_fp32": exact,
        "exact_bf16": dict(exact, vae_store_dtype="bfloat16", vae_precision="bf16", window_precision="bf16"),
    }
    masks, logits = {}, {}
    with torch.no_grad():
        for name, kw in settings.items():
            logits[name] = LatentSlidingWindowInferer(roi_size=64, overlap=0.5, **kw)(image, net)
            assert logits[name].dtype == torch.float32
            masks[name] = logits[name].argmax(1)
    for ref, fast in (("fp32", "windows_bf16"), ("exact_fp32", "exact_bf16")):
        assert not torch.equal(logits[ref], logits[fast]), f"{fast} changed nothing: was bf16 applied?"
    for ref, fast in (("fp32", "bf16"), ("fp32", "windows_bf16"), ("exact_fp32", "exact_bf16")):
        a, b = masks[ref], masks[fast]
        assert float((a == truth).float().mean()) > 0.7  # the model learned something: its labels are not noise
        present = [k for k in range(len(PHANTOM_LABELS)) if int((a == k).sum()) >= 100]
        assert len(present) >= 3
        for k in present:
            dice = 2 * int(((a == k) & (b == k)).sum()) / (int((a == k).sum()) + int((b == k).sum()))
            assert dice >= MASK_DICE, f"label {k} ({PHANTOM_LABELS[k]}): Dice {dice:.4f} between {ref} and {fast} masks"


def test_precision_choices_and_errors(demo_vae, volume) -> None:
    assert resolve_encode_precision("fp32", "cpu") == "fp32"
    assert resolve_encode_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        encode_volume(demo_vae, volume, roi=None, precision="fp16")
    with pytest.raises(ValueError, match="vae_precision must be one of"):
        LatentSlidingWindowInferer(roi_size=64, vae_precision="half")
    with pytest.raises(ValueError, match="window_precision must be one of"):
        LatentSlidingWindowInferer(roi_size=64, window_precision="fp16")
