"""Volume preprocessing shared by every bundle (VAE encoding, segmentation, generation).

The chain follows the paper's offline preprocessing: load, channel first, check finite, reorient to
RAS, normalise intensities by modality (CT window -175..250 HU or MR 0.5/99.5 percentiles -> 0..1,
clipped), resample to 1.5 mm, crop the foreground, centre-crop to at most 512x512x768, pad to at least
96^3 and to a multiple of 4. Every spatial step is a MONAI invertible transform acting on MetaTensors,
so ``monai.transforms.Invertd`` maps predictions back onto the original image grid.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianNoised,
    RandHistogramShiftd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPadd,
    Spacingd,
)

from custom_nets.data.datalist import DEFAULT_MODALITY, normalize_modality
from custom_nets.utils.errors import InputError

CT_WINDOW: tuple[float, float] = (-175.0, 250.0)
"""Hounsfield window mapped to 0..1 for CT (values outside are clipped)."""

MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Intensity percentiles mapped to 0..1 for MR (values outside are clipped)."""

# Axis labels passed explicitly: MONAI 1.5 warns about a changing default otherwise; images from our
# readers are always in RAS world coordinates.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


# nibabel for NIfTI (tried first for .nii/.nii.gz), ITK for everything else (NRRD, MHA/MHD).
# LoadImage tries the readers registered last first.
IMAGE_READERS: tuple[str, ...] = ("ITKReader", "NibabelReader")


def source_name(img: Any, fallback: str = "<image>") -> str:
    """The file an image was read from (``filename_or_obj`` in its meta data), or ``fallback``."""
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if name:
            return str(name)
    return fallback


def check_finite(img: torch.Tensor | np.ndarray, source: str | None = None) -> torch.Tensor | np.ndarray:
    """Return ``img`` unchanged if all voxels are finite; otherwise raise :class:`InputError`.

    Args:
        img: image array (a MetaTensor names its file in ``meta["filename_or_obj"]``).
        source: name to report; defaults to the image's file name.

    Returns:
        ``img`` itself.
    """
    finite = torch.isfinite(img) if isinstance(img, torch.Tensor) else np.isfinite(img)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise InputError(source or source_name(img), f"{n_bad} non-finite voxel(s) (NaN or Inf)")
    return img


class CheckFinited(MapTransform):
    """Dictionary transform: raise :class:`InputError` naming the file when an image has NaN/Inf voxels.

    Args:
        keys: keys of the images to check.
        allow_missing_keys: skip absent keys instead of failing.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_finite(d[key], source_name(d[key], fallback=str(key)))
        return d


class CheckLabelValuesd(MapTransform):
    """Dictionary transform: raise :class:`InputError` naming the file when a label map holds values
    other than the whole numbers 0..num_classes-1.

    The datalist builder checks this for files it lists; this transform checks it wherever the data
    come from (e.g. a MONAI Label server handing its own datalist to the bundle's train config).

    Args:
        keys: label keys.
        num_classes: number of classes including background.
        allow_missing_keys: skip absent keys instead of failing.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            values = torch.unique(torch.as_tensor(lab)).double()
            bad = values[(values != torch.round(values)) | (values < 0) | (values >= self.num_classes)]
            if bad.numel():
                shown = ", ".join(f"{float(v):g}" for v in bad[:5])
                raise InputError(source_name(lab, fallback=str(key)),
                                 f"label values {shown} are not classes 0..{self.num_classes - 1}")
        return d


class NormalizeIntensityByModalityd(MapTransform):
    """Map intensities to 0..1 (clipped) with a rule chosen by each item's modality.

    CT: fixed Hounsfield window ``ct_window`` (default -175..250 HU). MR: the image's own
    ``mr_percentiles`` (default 0.5 and 99.5), robust to bright outliers. The modality is read from
    ``data[modality_key]`` ("CT" or "MR", case-insensitive); items without it are ``default_modality``.
    This is an intensity transform and is not recorded for inversion (spatial inversion is unaffected).

    Args:
        keys: image keys to normalise (not labels).
        modality_key: item key holding the modality.
        ct_window: (low, high) HU mapped to (0, 1).
        mr_percentiles: (low, high) percentiles mapped to (0, 1).
        default_modality: modality of items without ``modality_key``.
        allow_missing_keys: skip absent keys instead of failing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        ct_window: Sequence[float] = CT_WINDOW,
        mr_percentiles: Sequence[float] = MR_PERCENTILES,
        default_modality: str = DEFAULT_MODALITY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(ct_window) != 2 or not ct_window[0] < ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {ct_window}")
        if len(mr_percentiles) != 2 or not 0 <= mr_percentiles[0] < mr_percentiles[1] <= 100:
            raise ValueError(f"mr_percentiles must be (low, high) with 0 <= low < high <= 100, got {mr_percentiles}")
        self.modality_key = modality_key
        self.default_modality = normalize_modality(default_modality)
        self.ct = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        self.mr = ScaleIntensityRangePercentiles(
            lower=mr_percentiles[0], upper=mr_percentiles[1], b_min=0.0, b_max=1.0, clip=True
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = d.get(self.modality_key)
        modality = self.default_modality if modality in (None, "") else normalize_modality(str(modality))
        scaler = self.ct if modality == "CT" else self.mr
        for key in self.key_iterator(d):
            d[key] = scaler(d[key])
        return d


def input_error_from(exc: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``exc``, if any.

    MONAI wraps every exception raised inside a transform chain in ``RuntimeError("applying transform
    ...")``; this walks the ``__cause__``/``__context__`` chain to find the user-facing error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, InputError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class PreprocessCompose(Compose):
    """``Compose`` that re-raises a bad-input :class:`InputError` as itself, not wrapped by MONAI.

    A caller running the chain directly then sees "<file>: <problem>" (MONAI datasets still wrap it;
    use :func:`input_error_from` there).
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as e:
            cause = input_error_from(e)
            if cause is None:
                raise
            raise cause.with_traceback(cause.__traceback__) from None


def preprocess_transforms(
    keys: Sequence[str] = ("image",),
    label_key: str | None = None,
    pixdim: float | Sequence[float] = 1.5,
    modality_key: str = "modality",
    crop_foreground: bool = True,
    max_size: int | Sequence[int] = (512, 512, 768),
    min_size: int | Sequence[int] = 96,
    divisor: int = 4,
    then: Sequence[Callable] | Compose | None = None,
    num_classes: int | None = None,
) -> Compose:
    """The paper's whole-volume preprocessing as a MONAI ``Compose`` of dictionary transforms.

    Steps: LoadImaged (MetaTensor with affine and file name) -> EnsureChannelFirstd -> CheckFinited ->
    Orientationd RAS -> NormalizeIntensityByModalityd -> Spacingd (bilinear images, nearest label) ->
    CropForegroundd (voxels > 0 of the first image key) -> CenterSpatialCropd(max_size) ->
    SpatialPadd(min_size) -> DivisiblePadd(divisor) -> float32 images.

    Args:
        keys: image keys (file paths on input).
        label_key: optional label key, resampled with nearest interpolation and cropped/padded alike.
        pixdim: output voxel spacing in mm (one value for all axes, or three).
        modality_key: item key holding "CT" or "MR" (missing -> CT).
        crop_foreground: crop to the bounding box of voxels > 0 of ``keys[0]`` (after normalisation).
        max_size: largest output size per axis (centre crop).
        min_size: smallest output size per axis (zero padding, i.e. the bottom of the 0..1 range).
        divisor: every output size is padded to a multiple of this.
        num_classes: with ``label_key``, label values must be the whole numbers 0..num_classes-1
            (:class:`CheckLabelValuesd`, right after loading).
        then: transforms appended after the preprocessing (a list or a ``Compose``), e.g. a
            config's ``@train#augmentation``; what follows sees the preprocessed item.

    Returns:
        Compose mapping {key: path, ...} to {key: MetaTensor float32 (C, X, Y, Z) in [0, 1], ...}.
    """
    image_keys = [keys] if isinstance(keys, str) else list(keys)
    if not image_keys:
        raise ValueError("preprocess_transforms needs at least one image key")
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    all_keys = image_keys + ([label_key] if label_key else [])
    modes = ["bilinear"] * len(image_keys) + (["nearest"] * 1 if label_key else [])
    pixdim_seq = (float(pixdim),) * 3 if isinstance(pixdim, (int, float)) else tuple(float(p) for p in pixdim)

    transforms: list[Any] = [
        LoadImaged(all_keys, reader=list(IMAGE_READERS), image_only=True, ensure_channel_first=False),
        EnsureChannelFirstd(all_keys),
        CheckFinited(all_keys),
        *([CheckLabelValuesd(label_key, num_classes)] if label_key and num_classes is not None else []),
        Orientationd(all_keys, axcodes="RAS", labels=RAS_LABELS),
        NormalizeIntensityByModalityd(image_keys, modality_key=modality_key),
        Spacingd(all_keys, pixdim=pixdim_seq, mode=modes, dtype=torch.float32),
    ]
    if crop_foreground:
        transforms.append(CropForegroundd(all_keys, source_key=image_keys[0], allow_smaller=True))
    transforms += [
        CenterSpatialCropd(all_keys, roi_size=max_size),
        SpatialPadd(all_keys, spatial_size=min_size),
        DivisiblePadd(all_keys, k=divisor),
        EnsureTyped(image_keys, dtype=torch.float32, track_meta=True),
    ]
    if then is not None:
        transforms += list(then.transforms if isinstance(then, Compose) else then)
    return PreprocessCompose(transforms)


def intensity_augmentation(keys: KeysCollection = "image", prob: float = 0.3) -> list[MapTransform]:
    """MONAI intensity augmentation for images in [0, 1] (after :class:`NormalizeIntensityByModalityd`):
    bias field, gamma, Gaussian noise and histogram shift, each applied with probability ``prob``.

    The same four transforms, with these settings, as the segmentation benchmark's ``unet_aug`` and
    ``latent_meduet_aug`` (benchmarks/seg_benchmark.py). There they raised Dice on phantom styles
    that no stage had seen, at a small cost on the training styles (REPORT.md, issue 16).

    Args:
        keys: image keys (never the label).
        prob: probability of each transform.

    Returns:
        the four randomised transforms, to append after cropping.
    """
    return [RandBiasFieldd(keys, prob=prob, coeff_range=(0.0, 0.3)),
            RandAdjustContrastd(keys, prob=prob, gamma=(0.6, 1.6)),
            RandGaussianNoised(keys, prob=prob, std=0.05),
            RandHistogramShiftd(keys, prob=prob, num_control_points=(5, 10))]


__all__ = [
    "CT_WINDOW",
    "MR_PERCENTILES",
    "CheckFinited",
    "CheckLabelValuesd",
    "PreprocessCompose",
    "input_error_from",
    "intensity_augmentation",
    "NormalizeIntensityByModalityd",
    "check_finite",
    "normalize_modality",
    "preprocess_transforms",
    "source_name",
]
