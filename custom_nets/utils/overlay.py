"""PNG overlays of label maps on images, for a person to check a segmentation at a glance.

One figure per volume: axial, coronal and sagittal slices through the centre of the labelled
region (the volume centre when nothing is labelled), the image in grey, each label in its own
colour, a legend naming the labels. Written atomically.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom_nets.utils.flags import as_bool
from custom_nets.utils.io import atomic_path

__all__ = ["label_slices", "save_label_overlay", "SaveLabelOverlayd"]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().as_subclass(torch.Tensor).numpy()
    return np.asarray(x)


def _squeeze_channel(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be (X, Y, Z) or (1, X, Y, Z), got shape {x.shape}")
    return x


def label_slices(label: np.ndarray) -> tuple[int, int, int]:
    """Slice indices (x, y, z) through the centre of mass of the labelled voxels (volume centre if none)."""
    fg = np.argwhere(label > 0)
    if len(fg) == 0:
        return tuple(int(s) // 2 for s in label.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in fg.mean(axis=0))  # type: ignore[return-value]


def save_label_overlay(
    image: Any,
    label: Any,
    path: str | Path,
    label_names: Mapping[int, str] | Sequence[str] | None = None,
    title: str | None = None,
    alpha: float = 0.45,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write a PNG with three orthogonal slices of ``image`` and ``label`` overlaid.

    Args:
        image: (X, Y, Z) or (1, X, Y, Z) intensities (any range; shown min..max).
        label: integer label map on the same grid.
        path: output PNG.
        label_names: names by label value, for the legend.
        title: figure title.
        alpha: label opacity.
        spacing: voxel size (mm) per axis, for the slices' aspect ratio (default isotropic).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    img = _squeeze_channel(_to_numpy(image).astype(np.float32), "image")
    lab = _squeeze_channel(_to_numpy(label), "label").astype(np.int64)
    if img.shape != lab.shape:
        raise ValueError(f"image {img.shape} and label {lab.shape} are not on the same grid")
    if isinstance(label_names, Sequence) and not isinstance(label_names, str):
        label_names = dict(enumerate(label_names))
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    sx, sy, sz = (float(s) for s in (spacing or (1.0, 1.0, 1.0)))
    n_labels = max(int(lab.max()), max(names, default=0)) + 1
    # tab10's saturated colours first (distinct at 45% opacity), then tab20's for larger label sets
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)]
    colors = [(0, 0, 0, 0)] + [palette[(i - 1) % len(palette)] for i in range(1, n_labels)]
    cmap = ListedColormap(colors)
    lo, hi = float(np.percentile(img, 0.5)), float(np.percentile(img, 99.5))
    cx, cy, cz = label_slices(lab)
    # RAS arrays: show axial (x right-left across, y anterior up), coronal and sagittal (z up)
    views = [
        ("axial", img[:, :, cz].T, lab[:, :, cz].T, sy / sx),
        ("coronal", img[:, cy, :].T, lab[:, cy, :].T, sz / sx),
        ("sagittal", img[cx, :, :].T, lab[cx, :, :].T, sz / sy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (name, im, lb, aspect) in zip(axes, views):
        ax.imshow(im, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", aspect=aspect)
        ax.imshow(np.ma.masked_equal(lb, 0), cmap=cmap, vmin=0, vmax=n_labels - 1, alpha=alpha,
                  origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    present = sorted(int(v) for v in np.unique(lab) if v > 0)
    handles = [Patch(color=colors[v], label=names.get(v, str(v))) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


class SaveLabelOverlayd(MapTransform):
    """Dictionary transform writing ``<output_dir>/<image stem><output_postfix>.png`` per item.

    The image file name comes from the image's meta data (``filename_or_obj``). Data pass through
    unchanged.

    Args:
        keys: the label (prediction) key.
        image_key: the image key (same grid as the label).
        output_dir: destination folder.
        label_names: names by label value, for the legend.
        output_postfix: appended to the image stem.
        enabled: write the PNGs (a switch: configs keep it off unless asked, since a server
            would otherwise write one per request).
        allow_missing_keys: skip items without the keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        output_dir: str | Path = "./",
        label_names: Mapping[int, str] | Sequence[str] | None = None,
        output_postfix: str = "_overlay",
        enabled: bool | str = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.label_names = label_names
        self.output_postfix = output_postfix
        self.enabled = as_bool(enabled, "save_overlays")

    @staticmethod
    def _stem(img: Any) -> str:
        meta = getattr(img, "meta", {}) or {}
        name = Path(str(meta.get("filename_or_obj") or "volume")).name
        for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return Path(name).stem

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        img = d[self.image_key]
        spacing = None
        pixdim = getattr(img, "pixdim", None)
        if pixdim is not None:
            spacing = [float(s) for s in _to_numpy(pixdim)[:3]]
        for key in self.key_iterator(d):
            stem = self._stem(img)
            save_label_overlay(
                img, d[key], self.output_dir / f"{stem}{self.output_postfix}.png", self.label_names,
                title=stem, spacing=spacing,
            )
        return d
