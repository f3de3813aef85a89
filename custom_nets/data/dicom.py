"""DICOM series -> NIfTI, with the checks that make a stack of slices a trustworthy volume.

A series folder holds the single-frame slices of one series (one SeriesInstanceUID). Slices are
ordered by their position along the slice normal; the spacing must be constant (a gap of k spacings
means missing slices). The volume is written as NIfTI so that MONAI's loaders read one file, with the
voxel-to-patient affine converted from DICOM's LPS to NIfTI's RAS.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from custom_nets.utils.errors import InputError
from custom_nets.utils.io import save_nifti, write_json

# Slice gaps are compared with the series' median gap. Scanners store ImagePositionPatient as
# decimal strings, often rounded to 0.1 mm: each coordinate is then off by up to POSITION_ROUNDING_MM,
# a position along the slice normal n by up to POSITION_ROUNDING_MM * |n|_1, and a gap (the difference
# of two positions) by twice that (0.1 mm for an axial series, up to 0.17 mm for an oblique one). A
# gap may differ from the median by that jitter plus SPACING_RTOL of the spacing; a larger deviation
# is a real gap (a whole number of spacings: missing slices) or an uneven series.
POSITION_ROUNDING_MM = 0.05
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with the DICOM preamble ("DICM" at byte 128) or a ``.dcm`` suffix."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def find_series_folders(root: str | Path) -> list[Path]:
    """Folders under ``root`` (itself included) that directly contain DICOM files, sorted."""
    root = Path(root)
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))
    return [d for d in folders if any(is_dicom_file(f) for f in d.iterdir())]


@dataclass
class DicomSeries:
    """A checked series: slices in spatial order and the geometry of the stacked volume.

    Attributes:
        folder: the series folder.
        files: slice files ordered along the slice normal.
        series_uid: SeriesInstanceUID.
        modality: DICOM Modality (e.g. "CT", "MR").
        shape: volume shape (columns, rows, slices), i.e. NIfTI i, j, k.
        affine: 4x4 voxel-to-world matrix in RAS millimetres.
        rescale: per-slice (slope, intercept).
    """

    folder: Path
    files: list[Path]
    series_uid: str
    modality: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    rescale: list[tuple[float, float]] = field(default_factory=list)


def _floats(values: object, n: int, path: Path, tag: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise InputError(path, f"bad {tag} ({values!r})") from e
    if arr.shape != (n,):
        raise InputError(path, f"bad {tag} ({values!r}), expected {n} numbers")
    return arr


def scan_series(folder: str | Path) -> DicomSeries:
    """Read the headers of every slice in ``folder`` (no pixels) and check they form one volume.

    Checks: one SeriesInstanceUID, single-frame greyscale slices with position/orientation/spacing,
    the same orientation, size and pixel spacing on every slice, at least two slices, no duplicate
    positions, and a constant spacing (a larger gap is reported as missing slices).

    Raises:
        InputError: naming the folder (or the slice file) and the problem.
    """
    import pydicom

    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if is_dicom_file(f))
    if not files:
        raise InputError(folder, "no DICOM files in this folder")
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
        except Exception as e:  # noqa: BLE001 - any parse failure makes the slice unusable
            raise InputError(f, f"unreadable DICOM file ({type(e).__name__}: {e})") from e
        if "Rows" not in ds:  # not an image (e.g. a structured report or DICOMDIR): not part of the volume
            continue
        headers.append((f, ds))
    if not headers:
        raise InputError(folder, "no DICOM image slices in this folder")

    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(uids) > 1:
        raise InputError(
            folder,
            f"{len(uids)} series in one folder (SeriesInstanceUID {', '.join(uids)}); "
            "put each series in its own folder",
        )

    f0, ds0 = headers[0]
    for f, ds in headers:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(f, f"multi-frame DICOM ({frames} frames) is not supported; export single-frame slices")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f, "colour DICOM is not supported; greyscale CT/MR slices are expected")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise InputError(f, f"missing {tag}; cannot place the slice in patient space")

    orientation = _floats(ds0.ImageOrientationPatient, 6, f0, "ImageOrientationPatient")
    pixel_spacing = _floats(ds0.PixelSpacing, 2, f0, "PixelSpacing")
    size = (int(ds0.Rows), int(ds0.Columns))
    positions = []
    for f, ds in headers:
        slice_orientation = _floats(ds.ImageOrientationPatient, 6, f, "ImageOrientationPatient")
        if not np.allclose(slice_orientation, orientation, atol=DIRECTION_ATOL):
            raise InputError(folder, f"slice orientation differs between {f0.name} and {f.name}")
        if not np.allclose(_floats(ds.PixelSpacing, 2, f, "PixelSpacing"), pixel_spacing, rtol=SPACING_RTOL):
            raise InputError(folder, f"pixel spacing differs between {f0.name} and {f.name}")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise InputError(folder, f"slice size differs between {f0.name} and {f.name}")
        positions.append(_floats(ds.ImagePositionPatient, 3, f, "ImagePositionPatient"))

    if len(headers) < 2:
        raise InputError(folder, "only one slice; a 3D series needs at least two")

    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions_arr = np.asarray(positions)
    along = positions_arr @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    _check_gaps(folder, gaps, along, jitter=2 * POSITION_ROUNDING_MM * float(np.abs(normal).sum()))

    ordered = [headers[i] for i in order]
    first, last = positions_arr[order[0]], positions_arr[order[-1]]
    step = (last - first) / (len(ordered) - 1)  # follows a gantry tilt exactly, unlike normal * spacing
    affine_lps = np.eye(4)
    # DICOM: pixel (row r, column c) lies at IPP + c * dc * row_dir + r * dr * col_dir, PixelSpacing = (dr, dc).
    affine_lps[:3, 0] = row_dir * pixel_spacing[1]
    affine_lps[:3, 1] = col_dir * pixel_spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = first
    rescale = [(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)) for _, ds in ordered]
    return DicomSeries(
        folder=folder,
        files=[f for f, _ in ordered],
        series_uid=uids[0],
        modality=str(ds0.get("Modality", "")).upper(),
        shape=(size[1], size[0], len(ordered)),
        affine=LPS_TO_RAS @ affine_lps,
        rescale=rescale,
    )


def _check_gaps(folder: Path, gaps: np.ndarray, along: np.ndarray, jitter: float = 0.0) -> None:
    """Raise InputError for duplicate positions, missing slices or uneven spacing.

    Args:
        folder: the series folder (for the message).
        gaps: distances between neighbouring slices along the normal, in position order (mm).
        along: the sorted positions along the normal (mm).
        jitter: how much a gap may be off through rounded positions (mm; see POSITION_ROUNDING_MM).
    """
    if np.any(gaps <= SPACING_ATOL_MM):
        i = int(np.argmax(gaps <= SPACING_ATOL_MM))
        raise InputError(folder, f"two slices at the same position ({along[i]:.3f} mm along the normal)")
    # the typical gap: rounding jitters single gaps, and missing slices only enlarge a few
    spacing = float(np.median(gaps))
    tol = SPACING_ATOL_MM + jitter + SPACING_RTOL * spacing
    off = np.abs(gaps - spacing) > tol
    if not off.any():
        return
    ratios = gaps / spacing
    whole = (np.round(ratios) >= 1) & (np.abs(gaps - np.round(ratios) * spacing) <= tol)
    if np.all(whole):
        n_missing = int(np.sum(np.round(ratios) - 1))
        i = int(np.argmax(off))
        raise InputError(
            folder,
            f"missing slice(s): {n_missing} missing, first gap of {gaps[i]:.3f} mm between "
            f"{along[i]:.3f} and {along[i + 1]:.3f} mm where slices are {spacing:.3f} mm apart",
        )
    raise InputError(folder, f"inconsistent slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm)")


def read_series_volume(series: DicomSeries) -> np.ndarray:
    """Stack the slices' rescaled pixel values into a (columns, rows, slices) array.

    Returns int16 when every value is a whole number within int16 (usual CT in HU), else float32.

    Raises:
        InputError: naming a slice whose pixel data cannot be decoded.
    """
    import pydicom

    volume = np.empty(series.shape, dtype=np.float32)
    for k, (f, (slope, intercept)) in enumerate(zip(series.files, series.rescale)):
        try:
            pixels = pydicom.dcmread(str(f), force=True).pixel_array
        except Exception as e:  # noqa: BLE001 - missing decoder, truncated pixel data, ...
            raise InputError(f, f"cannot decode pixel data ({type(e).__name__}: {e})") from e
        if pixels.shape != series.shape[1::-1]:
            raise InputError(f, f"pixel data shape {pixels.shape} differs from Rows x Columns {series.shape[1::-1]}")
        volume[:, :, k] = pixels.T.astype(np.float32) * slope + intercept
    whole_factors = all(float(s).is_integer() and float(i).is_integer() for s, i in series.rescale)
    info = np.iinfo(np.int16)
    if whole_factors and volume.min() >= info.min and volume.max() <= info.max:
        return volume.astype(np.int16)
    return volume


def series_fingerprint(series: DicomSeries) -> str:
    """Hash of the slice files' names, sizes and modification times (decides whether a cache is stale)."""
    h = hashlib.sha256()
    for f in series.files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def convert_series(series: DicomSeries, out_path: str | Path) -> Path:
    """Write ``series`` as NIfTI at ``out_path`` (``.nii.gz``), reusing an up-to-date earlier conversion.

    A sidecar ``<name>.json`` records the source folder, series UID and a fingerprint of the slices;
    both files are written atomically.

    Returns:
        ``out_path``.
    """
    out_path = Path(out_path)
    sidecar = out_path.with_name(out_path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    record = {
        "source": str(series.folder.resolve()),
        "series_uid": series.series_uid,
        "modality": series.modality,
        "n_slices": len(series.files),
        "fingerprint": series_fingerprint(series),
    }
    if out_path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == record:
                return out_path
        except (OSError, json.JSONDecodeError):
            pass  # unreadable sidecar: convert again

    volume = read_series_volume(series)
    save_nifti(out_path, volume, series.affine, dtype=None)  # scanner coordinates
    write_json(sidecar, record)
    return out_path
