"""Whole-volume inference for latent segmenters: encode each volume once, slide over the latent.

Image-space sliding windows (MONAI's ``SlidingWindowInferer``) re-encode every overlapping 96^3
window with the VAE: at overlap 0.5 each voxel goes through the VAE encoder about 8 times. Here the
volume is encoded once in tiles (``custom_nets.nets.vae.encode_volume``), then windows of
``roi_size / 4`` slide over the latent and :meth:`LatentSegmenter.forward_latent` returns logits
already at image resolution (``sliding_window_inference`` accepts outputs larger than inputs).

When the segmenter refines at full resolution it needs the image window that matches each latent
window. The image is folded into the latent grid (pixel-unshuffle: (1, X, Y, Z) ->
(64, X/4, Y/4, Z/4)) and concatenated to the latent, so a single sliding window cuts matching
latent and image windows; the predictor unfolds the image part again.

Blending: both spaces use the same window positions (image positions are 4x the latent ones) and
the same full-resolution importance map, so the two modes differ only by the VAE encoding (a
window encoded on its own vs. the same region inside tiles of the whole volume: the VAE's
GroupNorm statistics and zero padding at window borders differ).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.inferers import Inferer, SlidingWindowInferer, sliding_window_inference
from monai.networks.utils import pixelshuffle, pixelunshuffle
from monai.utils import convert_to_dst_type

from custom_nets.data.datalist import folder_items, load_datalist
from custom_nets.nets.vae import ENCODE_PRECISIONS, GRANULARITIES, resolve_encode_precision
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.parallel import unwrap
from custom_nets.utils.values import as_path

logger = logging.getLogger(__name__)

__all__ = ["LatentSlidingWindowInferer", "SPACES", "inference_items"]

SPACES = ("latent", "image")


def inference_items(
    dataset_dir: str | Path | None, datalist: str | Path | None = None, keys: Sequence[str] = ("testing",),
    missing_ok: bool = False,
) -> list[dict[str, Any]]:
    """Items to segment: the lists ``keys`` of a datalist JSON when given, else every image in ``dataset_dir``.

    Args:
        dataset_dir: folder of images (NIfTI/NRRD/MHA, or DICOM series, see
            :func:`custom_nets.data.datalist.folder_items`).
        datalist: optional datalist JSON (contract format); its items keep their "modality".
        keys: which lists of the datalist to segment.
        missing_ok: a missing folder or datalist gives no items (a config resolved before its data
            exist; its run stops in :func:`custom_nets.utils.inputs.require_inputs`).

    Returns:
        Items with absolute "image" paths.

    Raises:
        InputError / InputErrors: missing folder, no images, unreadable files (each named).
    """
    source = datalist if as_path(datalist) is not None else dataset_dir
    if as_bool(missing_ok, "missing_ok") and source not in (None, "") and is_missing(source):
        note_missing(source, "input")
        return []
    if as_path(datalist) is not None:
        data = load_datalist(datalist, keys=tuple(keys))
        return [dict(it) for k in keys for it in data[k]]
    if dataset_dir in (None, ""):
        raise ValueError("set dataset_dir (a folder of images) or datalist (a datalist JSON)")
    return folder_items(dataset_dir, domain="inference")


def _pad_to(x: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad the spatial axes of ``x`` at the end to ``size``; return the crop that undoes it."""
    spatial = list(x.shape[2:])
    pad: list[int] = []
    for s, t in reversed(list(zip(spatial, size))):
        pad += [0, max(0, int(t) - s)]
    if any(pad):
        x = F.pad(x, pad)
    return x, [slice(0, s) for s in spatial]


class LatentSlidingWindowInferer(Inferer):
    """Sliding-window inference over the VAE latent of the whole volume (default) or over the image.

    Args:
        roi_size: image window (96^3 in the paper); the latent window is ``roi_size / 4``.
        sw_batch_size: windows per forward pass.
        overlap: window overlap fraction (0.5 benchmark default, 0.75 in the authors' runs).
        mode: blending, "gaussian" or "constant" (MONAI names).
        sigma_scale: Gaussian sigma as a fraction of the window side.
        space: "latent" (encode once, windows over the latent) or "image" (MONAI's
            ``SlidingWindowInferer`` calling ``network(image_window)``).
        vae_roi_size: tile edge of the whole-volume VAE encoding, in image voxels (None: the largest
            side of ``roi_size``, i.e. tiles like the training crops).
        vae_overlap: tile overlap of the whole-volume VAE encoding.
        vae_exact: encode with whole-volume GroupNorm statistics (equal to one untiled pass);
            the default blends tiles of ``vae_roi_size`` whose statistics, like those of the 96^3
            training crops, are computed per tile.
        vae_precision: precision of the whole-volume VAE encoding: "fp32" (default), "bf16"
            (autocast; latent within ``custom_nets.nets.vae.BF16_LATENT_TOLERANCE`` of float32, tested)
            or "auto" (bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere).
        vae_channels_last: run the VAE's convolutions with channels-last-3d weights (same values).
        vae_granularity: stage split of ``vae_exact`` (``custom_nets.nets.vae.split_stages``):
            "resolution" (least memory), "block", or "norm" (every convolution computed once, each
            voxel encoded once up to halos; stores twice-wide full-resolution volumes).
        vae_store_dtype: dtype name of the whole-volume stage outputs ``vae_exact`` stores
            ("float32", or "bfloat16": half the memory, latent within the bf16 tolerance).
        window_precision: precision of the segmenter's windows (ViT and decoder; in image space the
            whole window network): "fp32" (default), "bf16" (autocast; logits returned in float32)
            or "auto" (bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere). The VAE encode
            follows ``vae_precision``.
        sw_device: device for the windows (default: the input's).
        device: device of the stitched output (default: the input's).
        progress: tqdm bar over windows.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int = 96,
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        space: str = "latent",
        vae_roi_size: int | None = None,
        vae_overlap: float = 0.25,
        vae_exact: bool = False,
        vae_precision: str = "fp32",
        vae_channels_last: bool = False,
        vae_granularity: str = "resolution",
        vae_store_dtype: str = "float32",
        window_precision: str = "fp32",
        sw_device: str | torch.device | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
        self.roi_size = (int(roi_size),) * 3 if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.mode = mode
        self.sigma_scale = float(sigma_scale)
        self.space = space
        self.vae_roi_size = max(self.roi_size) if vae_roi_size is None else int(vae_roi_size)
        self.vae_overlap = float(vae_overlap)
        self.vae_exact = as_bool(vae_exact, "vae_exact")
        if vae_precision not in ENCODE_PRECISIONS:
            raise ValueError(f"vae_precision must be one of {ENCODE_PRECISIONS}, got {vae_precision!r}")
        self.vae_precision = vae_precision
        self.vae_channels_last = as_bool(vae_channels_last, "vae_channels_last")
        if vae_granularity not in GRANULARITIES:
            raise ValueError(f"vae_granularity must be one of {GRANULARITIES}, got {vae_granularity!r}")
        if vae_store_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"vae_store_dtype must be 'float32' or 'bfloat16', got {vae_store_dtype!r}")
        self.vae_granularity, self.vae_store_dtype = vae_granularity, getattr(torch, vae_store_dtype)
        if window_precision not in ENCODE_PRECISIONS:
            raise ValueError(f"window_precision must be one of {ENCODE_PRECISIONS}, got {window_precision!r}")
        self.window_precision = window_precision
        self.sw_device = sw_device
        self.device = device
        self.progress = as_bool(progress, "progress")
        self._image_inferer = SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode=mode,
            sigma_scale=self.sigma_scale, sw_device=sw_device, device=device, progress=self.progress,
        )

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """(B, Ci, X, Y, Z) image -> (B, K, X, Y, Z) logits."""
        net = unwrap(network)
        if self.space == "image":
            return self.image_windows(inputs, network, *args, **kwargs)
        if not (hasattr(net, "forward_latent") and hasattr(net, "encode_volume")):
            # e.g. a TorchScript export, which only keeps forward(image)
            logger.warning("%s has no latent interface; sliding windows over the image instead", type(net).__name__)
            return self.image_windows(inputs, network, *args, **kwargs)
        return self.latent_windows(inputs, net)

    def window_autocast(self, device: str | torch.device) -> torch.autocast:
        """The autocast context of ``window_precision`` on ``device`` (disabled for fp32)."""
        device = torch.device(device)
        precision = resolve_encode_precision(self.window_precision, device)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def image_windows(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """MONAI's image-space sliding window, under ``window_precision``; float32 logits."""
        with self.window_autocast(self.sw_device or inputs.device):
            logits = self._image_inferer(inputs, network, *args, **kwargs)
        return logits.float() if logits.is_floating_point() else logits

    def latent_windows(self, image: torch.Tensor, net: Any) -> torch.Tensor:
        """Encode ``image`` once, slide over its latent, stitch logits on the image grid."""
        f = int(net.vae_factor)
        if any(r % f for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be divisible by the VAE factor {f}")
        latent_roi = [r // f for r in self.roi_size]
        # pad (zero = bottom of the 0..1 intensity range) to whole latent voxels and at least one window
        target = [max(-(-s // f) * f, r) for s, r in zip(image.shape[2:], self.roi_size)]
        x, crop = _pad_to(image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else image, target)
        latent = net.encode_volume(x, roi_size=self.vae_roi_size, overlap=self.vae_overlap, exact=self.vae_exact,
                                   precision=self.vae_precision, channels_last=self.vae_channels_last,
                                   granularity=self.vae_granularity, store_dtype=self.vae_store_dtype)
        latent = latent.to(x.device, x.dtype)
        c = latent.shape[1]
        needs_image = bool(getattr(net, "needs_image", False))
        packed = torch.cat([latent, pixelunshuffle(x, 3, f)], dim=1) if needs_image else latent

        cast = self.window_autocast(self.sw_device or x.device)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            with cast:
                if needs_image:
                    out = net.forward_latent(window[:, :c], pixelshuffle(window[:, c:], 3, f))
                else:
                    out = net.forward_latent(window)
            return out.float()  # stitch in float32 whatever the windows ran at

        weight = compute_importance_map(
            self.roi_size, mode=self.mode, sigma_scale=self.sigma_scale,
            device=self.sw_device or x.device, dtype=torch.float32,
        )[None, None]

        def full_resolution_weights(outputs: Any, window: torch.Tensor, _latent_weight: torch.Tensor) -> tuple:
            # the image-resolution importance map, identical to the one image-space windows use
            return outputs, weight

        logits = sliding_window_inference(
            packed, roi_size=latent_roi, sw_batch_size=self.sw_batch_size, predictor=predictor,
            overlap=self.overlap, mode="constant", sw_device=self.sw_device, device=self.device,
            progress=self.progress, process_fn=full_resolution_weights,
        )
        logits = logits[(slice(None), slice(None), *crop)]
        # keep the input's type and meta data (affine, file name, applied transforms) as MONAI's inferers do
        return convert_to_dst_type(logits, image, device=logits.device)[0]
