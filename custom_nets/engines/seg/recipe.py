"""The fine-tuning recipe of the segmentation bundle: class prior in the output bias, optimizer groups
(pretrained encoder with layer-wise decay vs new decoder) and class-balanced crops with cached indices.

Why each piece (issue 16): a zero output bias starts every class at 1/K, so the first hundreds of
steps only learn the class frequencies; one learning rate either destroys the pretrained ViT or
starves the random decoder; "positive" crops centre on any foreground voxel and the body label is
~85 % of the foreground, so small organs are rarely in a crop.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "class_frequencies",
    "sampled_class_frequencies",
    "init_output_bias",
    "output_conv",
    "encoder_layer_id",
    "segmenter_param_groups",
    "balanced_crop_transforms",
]


def class_frequencies(labels: Iterable[Any], num_classes: int) -> torch.Tensor:
    """Voxel frequency of each class over label maps.

    Args:
        labels: integer label arrays or tensors (any shape), or dicts with a "label" entry.
        num_classes: number of classes (background included).

    Returns:
        (num_classes,) float64 tensor summing to 1.

    Raises:
        ValueError: no voxels, or a value outside 0..num_classes-1.
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for lab in labels:
        if isinstance(lab, Mapping):
            lab = lab["label"]
        t = torch.as_tensor(np.asarray(lab)).reshape(-1).long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"label values must lie in 0..{num_classes - 1}, got {int(t.min())}..{int(t.max())}")
        counts += torch.bincount(t, minlength=num_classes).double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("no label voxels to count class frequencies from")
    return counts / total


def sampled_class_frequencies(dataset: Any, num_classes: int, passes: int = 2, label_key: str = "label") -> torch.Tensor:
    """Class frequencies in the training crops as the sampler draws them (the prior the loss sees).

    Args:
        dataset: a MONAI dataset whose items are a crop dict or a list of crop dicts.
        num_classes: classes (background included).
        passes: passes over the dataset (crops are random).
        label_key: label key of the crops.

    Returns:
        (num_classes,) frequencies (:func:`class_frequencies`).
    """
    def crops() -> Iterable[Any]:
        for _ in range(max(1, int(passes))):
            for i in range(len(dataset)):
                out = dataset[i]
                for c in out if isinstance(out, (list, tuple)) else [out]:
                    yield c[label_key]

    return class_frequencies(crops(), num_classes)


def output_conv(network: nn.Module, num_classes: int | None = None) -> nn.Module:
    """The convolution producing the logits: ``network.output_conv`` when defined, otherwise the last
    convolution (in module order) with ``num_classes`` output channels (MONAI UNet, SwinUNETR...)."""
    net = network.module if isinstance(getattr(network, "module", None), nn.Module) else network
    if hasattr(net, "output_conv"):
        return net.output_conv
    convs = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)
             and (num_classes is None or m.out_channels == num_classes)]
    if not convs:
        raise ValueError(f"{type(net).__name__}: no convolution with {num_classes} output channels")
    return convs[-1]


def init_output_bias(network: nn.Module, frequencies: Sequence[float] | torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Set the logit bias to log class frequencies, so that softmax starts near the class prior.

    Args:
        network: segmenter (see :func:`output_conv`).
        frequencies: (K,) class frequencies (background included), e.g. :func:`class_frequencies`.
        eps: floor for absent classes (log 0 would be -inf).

    Returns:
        The bias that was set.
    """
    freq = torch.as_tensor(frequencies, dtype=torch.float64).clamp_min(eps)
    freq = freq / freq.sum()
    conv = output_conv(network, len(freq))
    if conv.bias is None or conv.bias.numel() != len(freq):
        raise ValueError(f"output convolution {conv} has no bias of {len(freq)} classes")
    bias = freq.log() - freq.log().mean()
    with torch.no_grad():
        conv.bias.copy_(bias.to(conv.bias))
    logger.info("output bias from class frequencies %s", [round(float(f), 4) for f in freq])
    return conv.bias.detach().clone()


_BLOCK = re.compile(r"(?:^|\.)encoder\.blocks\.(\d+)\.")


def encoder_layer_id(name: str, depth: int) -> int | None:
    """Layer index of a pretrained-ViT parameter for layer-wise decay (None: not in the ViT).

    0: patch embedding and cls token; i + 1: block i; depth + 1: the final norm.
    """
    if not (name.startswith("encoder.") or ".encoder." in name) or ".vae." in f".{name}":
        return None
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    if re.search(r"encoder\.(patch_embed|cls_token|pos_embed)", name):
        return 0
    return depth + 1


def segmenter_param_groups(
    network: nn.Module,
    lr: float,
    encoder_lr_scale: float = 0.1,
    layer_decay: float = 0.75,
    weight_decay: float = 1e-5,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: the new decoder at ``lr``, the pretrained ViT at ``lr * encoder_lr_scale``
    with layer-wise decay (block i at ``decay ** (depth + 1 - (i + 1))`` of that), no weight decay
    on biases and norms; frozen parameters (the VAE) left out.

    Args:
        network: :class:`~custom_nets.nets.latent_segmenter.LatentSegmenter` (or any network; without
            an ``encoder`` ViT every parameter is "decoder").
        lr: decoder learning rate.
        encoder_lr_scale: ViT learning rate relative to ``lr`` (1.0 with ``layer_decay`` 1.0: one lr).
        layer_decay: per-block factor from the top of the ViT down.
        weight_decay: AdamW weight decay of weights (not of biases and norms).

    Returns:
        Groups with "params", "lr", "weight_decay" and a "name" for logs.
    """
    net = network.module if isinstance(getattr(network, "module", None), nn.Module) else network
    depth = len(getattr(getattr(net, "encoder", None), "blocks", []))
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        layer = encoder_layer_id(name, depth) if depth else None
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "cls_token" in name
        if layer is None:
            key, plr = ("decoder", no_decay), float(lr)
        else:
            key = (f"encoder.layer{layer}", no_decay)
            plr = float(lr) * float(encoder_lr_scale) * float(layer_decay) ** (depth + 1 - layer)
        g = groups.setdefault(key, {"params": [], "lr": plr, "weight_decay": 0.0 if no_decay else float(weight_decay),
                                    "name": f"{key[0]}{'.no_decay' if no_decay else ''}"})
        g["params"].append(p)
    if not groups:
        raise ValueError("the network has no trainable parameters")
    return list(groups.values())


def balanced_crop_transforms(
    keys: Sequence[str],
    label_key: str,
    roi_size: Sequence[int],
    num_classes: int,
    num_samples: int = 1,
    ratios: Sequence[float] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Class-balanced crops: a cached part (per-class voxel indices, once per volume) and a random part.

    Put the first list after the deterministic preprocessing (a ``CacheDataset`` caches it) and the
    second at the start of the augmentation.

    Args:
        keys: keys to crop (images and label).
        label_key: label key.
        roi_size: crop size.
        num_classes: classes (background included).
        num_samples: crops per volume and step.
        ratios: relative frequency of each class as a crop centre (default: equal, background included);
            classes absent from a volume are skipped for it.

    Returns:
        (cached transforms, random transforms).
    """
    from monai.transforms import ClassesToIndicesd, DeleteItemsd, RandCropByLabelClassesd

    ratios = [1.0] * num_classes if ratios is None else [float(r) for r in ratios]
    if len(ratios) != num_classes or min(ratios) < 0 or not math.isfinite(sum(ratios)) or sum(ratios) <= 0:
        raise ValueError(f"crop ratios must be {num_classes} non-negative numbers with a positive sum, got {ratios}")
    indices_key = f"{label_key}_cls_indices"
    cached = [ClassesToIndicesd(keys=label_key, num_classes=num_classes, indices_postfix="_cls_indices")]
    rand = [RandCropByLabelClassesd(keys=list(keys), label_key=label_key, spatial_size=list(roi_size), ratios=ratios,
                                    num_classes=num_classes, num_samples=num_samples, indices_key=indices_key,
                                    warn=False, allow_smaller=False),
            DeleteItemsd(keys=indices_key)]  # per-volume index lists do not collate into batches
    return cached, rand
