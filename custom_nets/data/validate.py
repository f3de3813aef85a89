"""Checks on image and label files before anything trains on them.

Every check returns problems as :class:`InputError` ("<file>: <problem>") instead of stopping at the
first one, so that a user fixing a collection sees all bad files in one run. Headers are read without
the voxel data; the optional full read loads each file's voxels exactly once (NIfTI through nibabel
without applying the scale factors, NRRD/MHA/MHD through ITK) and checks them in chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from custom_nets.utils.errors import InputError

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES: tuple[str, ...] = NIFTI_SUFFIXES + ITK_SUFFIXES

# Label and image grids must agree to this precision (mm) after both are put into RAS voxel order:
# headers written by different tools round spacing/origin differently (e.g. float32 NIfTI qforms).
GRID_ATOL_MM = 1e-3
ORIGIN_ATOL_MM = 1e-2

# Voxels checked per step in the full read, to keep the temporary boolean arrays small.
_CHUNK = 1 << 24


def image_suffix(path: str | Path) -> str | None:
    """The supported image suffix of ``path`` (".nii.gz", ".nrrd", ...) or None."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def strip_image_suffix(path: str | Path) -> str:
    """File name of ``path`` without its image suffix ("case_0000.nii.gz" -> "case_0000")."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file read from its header.

    Attributes:
        path: the file.
        shape: array shape as stored (spatial axes first; NIfTI may have trailing axes).
        components: values per voxel (ITK vector images; 1 otherwise).
        affine: 4x4 voxel-to-world matrix in RAS millimetres (ITK's LPS converted).
        dtype: stored data type, as text.
    """

    path: Path
    shape: tuple[int, ...]
    components: int
    affine: np.ndarray
    dtype: str

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[:3]

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def dimension_problem(header: ImageHeader) -> str | None:
    """Why ``header`` is not a single 3D volume, or None if it is.

    Accepted: three spatial axes of size >= 2 plus any number of trailing singleton axes.
    """
    shape = header.shape
    if len(shape) < 3:
        return f"2D image (shape {list(shape)}); a 3D volume is expected"
    if any(s < 2 for s in shape[:3]):
        return f"single-slice image (shape {list(shape)}); a 3D volume is expected"
    extra = shape[3:]
    if any(s != 1 for s in extra):
        return (
            f"{len(shape)}D image (shape {list(shape)}) with {int(np.prod(extra))} volumes/channels; "
            "one 3D volume is expected"
        )
    if header.components != 1:
        return f"{header.components} components per voxel; one 3D scalar volume is expected"
    return None


# ----------------------------------------------------------------------------------------- reading


def read_header(path: str | Path) -> ImageHeader:
    """Read the geometry of an image without its voxels.

    Raises:
        InputError: missing file, unsupported suffix, or unreadable header.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = image_suffix(path)
    if suffix is None:
        raise InputError(path, f"unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        if suffix in NIFTI_SUFFIXES:
            return _nifti_header(path)
        return _itk_header(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means the header is unreadable
        raise InputError(path, f"unreadable header ({type(e).__name__}: {e})") from e


def _nifti_header(path: Path) -> ImageHeader:
    import nibabel as nib

    img = nib.load(str(path))
    affine = np.asarray(img.affine, dtype=np.float64)
    return ImageHeader(path, tuple(int(s) for s in img.shape), 1, affine, str(img.get_data_dtype()))


def _itk_image_io(path: Path) -> Any:
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise InputError(path, "ITK cannot read this file")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    return io


def _itk_header(path: Path) -> ImageHeader:
    io = _itk_image_io(path)
    ndim = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    n = min(ndim, 3)
    affine = np.eye(4)
    for i in range(n):
        direction = np.asarray(io.GetDirection(i), dtype=np.float64)[:n]
        affine[:n, i] = direction * float(io.GetSpacing(i))
        affine[i, 3] = float(io.GetOrigin(i))
    # ITK world coordinates are LPS; flip x and y for RAS (as MONAI's ITKReader does).
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    dtype = io.GetComponentTypeAsString(io.GetComponentType())
    return ImageHeader(path, shape, int(io.GetNumberOfComponents()), affine, dtype)


@dataclass
class VoxelSummary:
    """What a full read learned about the voxels (scaled values).

    Attributes:
        n_nonfinite: NaN/Inf voxels.
        minimum, maximum: range of the finite values.
        integer: every finite value is a whole number.
    """

    n_nonfinite: int
    minimum: float
    maximum: float
    integer: bool


def summarize_voxels(path: str | Path) -> VoxelSummary:
    """Read the voxels of ``path`` once and summarise them (truncated/corrupt data raises InputError)."""
    path = Path(path)
    suffix = image_suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            raw, slope, inter = _nifti_raw(path)
        else:
            raw, slope, inter = _itk_raw(path), 1.0, 0.0
    except Exception as e:  # noqa: BLE001 - truncated gzip (EOFError), zlib.error, ITK RuntimeError, ...
        raise InputError(path, f"unreadable voxel data ({type(e).__name__}: {e})") from e
    return _summarize(raw, slope, inter)


def _nifti_raw(path: Path) -> tuple[np.ndarray, float, float]:
    """Stored (unscaled) voxels plus the NIfTI scale factors, so int16 CT is not promoted to float64."""
    import nibabel as nib

    img = nib.load(str(path))
    proxy = img.dataobj
    raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    return raw, slope, inter


def _itk_raw(path: Path) -> np.ndarray:
    import itk

    image = itk.imread(str(path))
    return itk.array_view_from_image(image)


def _summarize(raw: np.ndarray, slope: float, inter: float) -> VoxelSummary:
    if not (np.isfinite(slope) and np.isfinite(inter)):
        return VoxelSummary(int(raw.size), float("nan"), float("nan"), False)
    flat = np.ravel(raw, order="K")
    if flat.size == 0:
        return VoxelSummary(0, float("nan"), float("nan"), False)
    is_int_dtype = np.issubdtype(flat.dtype, np.integer) or flat.dtype == np.bool_
    n_bad, lo, hi, integer = 0, np.inf, -np.inf, True
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if is_int_dtype:
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
            continue
        finite = np.isfinite(chunk)
        n_chunk_bad = int(chunk.size - np.count_nonzero(finite))
        n_bad += n_chunk_bad
        good = chunk[finite] if n_chunk_bad else chunk
        if good.size:
            lo, hi = min(lo, float(good.min())), max(hi, float(good.max()))
            if integer and slope == 1.0 and inter == 0.0:
                integer = bool(np.all(good == np.round(good)))
    if slope != 1.0 or inter != 0.0:
        # Scaled values are whole numbers if the raw values are and the factors are whole numbers;
        # otherwise decide on the scaled data (rare for labels).
        if is_int_dtype and float(slope).is_integer() and float(inter).is_integer():
            integer = True
        else:
            scaled = flat.astype(np.float64) * slope + inter
            integer = bool(np.all(scaled[np.isfinite(scaled)] == np.round(scaled[np.isfinite(scaled)])))
        lo, hi = sorted((lo * slope + inter, hi * slope + inter))
    return VoxelSummary(n_bad, lo, hi, integer)


# ---------------------------------------------------------------------------------------- checks


def canonical_grid(header: ImageHeader) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and affine after reorienting to the closest RAS axis order (as Orientationd does)."""
    import nibabel.orientations as nio

    affine = header.affine
    ornt = nio.io_orientation(affine)
    shape = header.spatial_shape
    new_affine = affine @ nio.inv_ornt_aff(ornt, shape)
    new_shape = tuple(int(shape[int(ax)]) for ax in np.argsort(ornt[:, 0]))
    return new_shape, new_affine


def grid_mismatch(image: ImageHeader, label: ImageHeader) -> str | None:
    """Why ``label`` does not lie on ``image``'s voxel grid, or None if it does.

    Grids are compared in RAS voxel order, so a label stored e.g. LAS on the same physical grid passes.
    """
    img_shape, img_aff = canonical_grid(image)
    lab_shape, lab_aff = canonical_grid(label)
    if img_shape != lab_shape:
        return f"label grid {list(lab_shape)} differs from image grid {list(img_shape)} ({image.path.name})"
    if not np.allclose(img_aff[:3, :3], lab_aff[:3, :3], atol=GRID_ATOL_MM) or not np.allclose(
        img_aff[:3, 3], lab_aff[:3, 3], atol=ORIGIN_ATOL_MM
    ):
        return (
            f"label affine differs from image affine ({image.path.name}): "
            f"label {np.round(lab_aff[:3], 4).tolist()} vs image {np.round(img_aff[:3], 4).tolist()}"
        )
    return None


def check_image(
    path: str | Path, *, verify_data: bool = True, is_label: bool = False, num_classes: int | None = None
) -> tuple[ImageHeader | None, list[InputError]]:
    """Check one file: exists, readable, one 3D volume and, with ``verify_data``, its voxels.

    Args:
        path: image or label file.
        verify_data: read the voxels (catches truncated files, NaN/Inf, bad label values).
        is_label: also require whole, non-negative values (and <= ``num_classes`` when given).
        num_classes: number of foreground classes: label values must lie in 0..num_classes.

    Returns:
        (header or None when unreadable, problems found).
    """
    path = Path(path)
    try:
        header = read_header(path)
    except InputError as e:
        return None, [e]
    problem = dimension_problem(header)
    if problem:
        return header, [InputError(path, problem)]
    if not verify_data:
        return header, []
    try:
        summary = summarize_voxels(path)
    except InputError as e:
        return header, [e]
    problems: list[InputError] = []
    if summary.n_nonfinite:
        problems.append(InputError(path, f"{summary.n_nonfinite} non-finite voxel(s) (NaN or Inf)"))
    if is_label:
        if not summary.integer:
            problems.append(InputError(path, "label values are not whole numbers"))
        elif summary.minimum < 0:
            problems.append(InputError(path, f"negative label value {summary.minimum:g}"))
        elif num_classes is not None and summary.maximum > num_classes:
            problems.append(
                InputError(path, f"label value {summary.maximum:g} above the largest class {num_classes}")
            )
    return header, problems


def check_item(
    item: Mapping[str, Any],
    *,
    verify_data: bool = True,
    require_label: bool = False,
    num_classes: int | None = None,
    where: str = "item",
) -> list[InputError]:
    """Check an item's image and optional label, and that the label lies on the image's grid.

    Args:
        item: {"image": path, "label": optional path, ...} with paths already resolved.
        verify_data: also read the voxels (see :func:`check_image`).
        require_label: a missing "label" is a problem.
        num_classes: passed to the label check.
        where: how to name the item when it has no image path.

    Returns:
        problems found (empty when the item is fine).
    """
    if not item.get("image"):
        return [InputError(where, "item has no 'image'")]
    img_header, problems = check_image(item["image"], verify_data=verify_data)
    label = item.get("label")
    if not label:
        if require_label:
            problems.append(InputError(item["image"], "no label given for this image"))
        return problems
    lab_header, lab_problems = check_image(label, verify_data=verify_data, is_label=True, num_classes=num_classes)
    problems += lab_problems
    if img_header is not None and lab_header is not None and not problems:
        mismatch = grid_mismatch(img_header, lab_header)
        if mismatch:
            problems.append(InputError(label, mismatch))
    return problems


def check_items(
    items: Iterable[Mapping[str, Any]],
    *,
    verify_data: bool = True,
    require_label: bool = False,
    num_classes: int | None = None,
) -> list[InputError]:
    """All problems of all ``items`` (see :func:`check_item`), in item order."""
    problems: list[InputError] = []
    for i, item in enumerate(items):
        problems += check_item(
            item, verify_data=verify_data, require_label=require_label, num_classes=num_classes, where=f"item {i}"
        )
    return problems

